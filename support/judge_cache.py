"""Every judgment on disk, so a rerun never pays twice: judge.py's `cached_score` asks the judge
only for the prompts this cache does not hold.

    with JudgeCache("out/.work/judgments.jsonl") as cache:
        cache.add("openai:gpt-4.1-mini-2025-04-14", prompt, 83.3)
        cache.scores[JudgeCache.key("openai:gpt-4.1-mini-2025-04-14", prompt)]  # 83.3
"""

import hashlib
import json
import math
from pathlib import Path

from support import UserError

NO_ANSWER = math.nan  # a judgment with neither a number nor a refusal: no score, and never cached


def no_answer(score) -> bool:
    """Whether a judge's result is NO_ANSWER (words, an empty reply), not a score or a refusal
    (None)."""
    return isinstance(score, float) and math.isnan(score)


class JudgeCache:
    """A JSONL file, one {"key", "judge", "score"} per line.

    The key is sha256(judge name, prompt): the same prompt under another judge is judged again. Only
    answers are kept: a score, or a refusal (score null, "refused": true); a judgment that was
    neither (NO_ANSWER) is never written, so a fixed judge is asked again. Lines are appended and
    flushed one by one; a line torn by a kill is dropped on load (and cut off, so the next append
    starts clean). Deleting the file judges everything again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.scores: dict[str, float | None] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self.path.read_bytes() if self.path.exists() else b""
        except OSError as e:  # a folder of that name, a file where its folder should be
            raise UserError(
                f"cannot use {self.path} as the judge cache ({e.strerror}): move "
                "what is in the way, or choose another output folder"
            ) from None
        complete = data[: data.rfind(b"\n") + 1]  # up to the last newline; the rest is a torn line
        lines = complete.decode("utf-8", errors="replace").splitlines()
        for lineno, line in enumerate(lines, start=1):
            key, score, refused = self._parse(line, lineno)
            if score is not None or refused:  # older files also cached failures as null
                self.scores[key] = score
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _parse(self, line: str, lineno: int) -> tuple[str, float | None, bool]:
        """(key, score, whether it is a refusal) of one line, or a UserError naming the line."""
        try:
            record = json.loads(line)
            key, score = record["key"], record["score"]
            number = isinstance(score, (int, float)) and not isinstance(score, bool)
            if not isinstance(key, str) or not (score is None or number and math.isfinite(score)):
                raise TypeError  # NaN, Infinity (json reads them) or true: no judgment
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{self.path}:{lineno} is not a judge-cache record: delete that line "
                "(or the file, to judge everything again)"
            ) from None
        return key, score, record.get("refused") is True

    @staticmethod
    def key(judge_name: str, prompt: str) -> str:
        joined = json.dumps([judge_name, prompt])  # an unambiguous join
        return hashlib.sha256(joined.encode("utf-8")).hexdigest()

    def add(self, judge_name: str, prompt: str, score: float | None) -> None:
        assert not no_answer(score), "NO_ANSWER is not a judgment to keep"
        key = self.key(judge_name, prompt)
        self.scores[key] = score
        record = {"key": key, "judge": judge_name, "score": score}
        if score is None:
            record["refused"] = True
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.scores)
