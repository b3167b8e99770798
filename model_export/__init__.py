"""The offline side: data, models, training, evaluation, the ONNX export and the refresh
cycle (despite the name, which is fixed: everything that makes a bundle before serving)."""
