"""`chorus-run`: a whole federation (coordinator + participants) in one process, with a live report.

It composes the coordinator and participant services, so it belongs to neither package.
"""
