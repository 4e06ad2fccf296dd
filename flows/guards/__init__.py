"""WHAT an operator can rely on: one run per workspace (``workspace_lock``), every wait has an end (``waits``),
SIGTERM ends a run within seconds (``stopping``), and nothing a run form names reaches outside the project
(``run_form``).
"""
