"""The task: run configuration, data, task models, ONNX task format, first-order baselines' settings, tracking."""
