"""The privacy audit (`make bench-privacy`): what a member's answers reveal about its private data.

Canaries in one member's private data (bench/privacy/canaries.py); after each method trains, their
exposure, verbatim hits and a membership attack under every member's model (bench/privacy/audit.py);
the figures with intervals over seeds (bench/privacy/report.py).
"""
