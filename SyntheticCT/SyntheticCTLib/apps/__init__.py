"""Applications: the demo, evaluation on phantom cases, batch synthesis, the HTML report and the
child-process runner that the Slicer modules use. They combine the layers below them; only the
command line (:mod:`SyntheticCTLib.cli`) stands above them.
"""
