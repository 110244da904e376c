"""The group-advantage core shared by flowalign (images) and llmalign (text).

Pure functions of tensors: advantages, clipped policy losses, KL estimators, preference losses,
reward composition, group filtering, per-prompt statistics; plus config and checkpoint helpers.
Imports neither front end.
"""
