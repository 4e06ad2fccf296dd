"""WHAT a new query gets after a pipeline run: its explanation from the saved indexes (``explanation``), the
library calls of the ``explain`` flow.
"""
