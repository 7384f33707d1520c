"""Using a trained model: open it (checkpoint, ONNX, OpenVINO) into a predictor, evaluate, predict, tile,
calibrate, export, serve over HTTP, audit labels with held-out fold models and talk to Label Studio."""
