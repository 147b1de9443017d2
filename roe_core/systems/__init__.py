"""The routing systems, one file each, behind one interface (pipeline.py)."""
