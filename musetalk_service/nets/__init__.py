"""Networks and weight loading (VAE, UNet, whisper encoder, BiSeNet, S3FD, FAN). No HTTP, no ffmpeg."""
