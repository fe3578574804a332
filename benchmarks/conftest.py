import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets the pytest-benchmark files import the CLI module
