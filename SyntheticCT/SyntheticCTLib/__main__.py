"""``python -m SyntheticCTLib`` runs the ``syntheticct`` command line (Slicer runs it with PythonSlicer)."""

from SyntheticCTLib.cli.main import entry_point

if __name__ == "__main__":
    entry_point()
