"""Export of the model to ONNX and OpenVINO: input checks and the INT8 policy (teacher only).

Nothing here imports the model or the apps.
"""
