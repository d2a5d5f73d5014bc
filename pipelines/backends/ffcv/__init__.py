"""loader=ffcv: .beton files read by ffcv's JIT pipeline."""
