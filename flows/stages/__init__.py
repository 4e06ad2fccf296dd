"""WHAT each stage computes: one module per stage, named as the stage (the ``influence`` stage:
``influence_function``), each with the same small interface (:mod:`flows.stages.entry`). Importing one stage
does not import the others.
"""
