"""ffmpeg around the pipeline: probe, decode, encode, mux, audio decode, test media. No torch."""
