import sys
from pathlib import Path

# tests import the flat scripts (model.py, hub.py, ...) and the golden-data scripts beside them
sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]
