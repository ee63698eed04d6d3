"""What training needs around the model: teacher weights, the teacher-feature cache, data checks, checkpoints.

Nothing here imports the model or the apps.
"""
