"""The offline builder: model source -> ONNX -> cut points -> segments -> verified, profiled
engines -> manifest. Imports engines only; torch is imported lazily by model sources."""
