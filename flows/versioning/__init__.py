"""WHICH data a run used: reading the data version (``data_version``) and acting on DVC: commit, push, check
out, record the stages in ``dvc.lock`` (``dvc``).
"""
