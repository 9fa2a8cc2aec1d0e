"""UNet phase: shapes, dtype and the BGR output against a manual decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musetalk_service.pipeline.generate import generate_faces


def _inputs(bundle, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 8, 32, 32, generator=generator)
    audio = torch.randn(batch, bundle.token_count, bundle.audio_dim, generator=generator)
    return latents, audio


def test_faces_are_uint8_bgr_of_the_decoded_latent(tiny_bundle):
    latents, audio = _inputs(tiny_bundle)
    faces = generate_faces(tiny_bundle, latents, audio)
    assert faces.shape == (2, 256, 256, 3) and faces.dtype == np.uint8
    assert faces.flags.c_contiguous

    with torch.inference_mode():
        predicted = tiny_bundle.unet(latents, torch.tensor([0]), encoder_hidden_states=tiny_bundle.pe(audio)).sample
        decoded = tiny_bundle.vae.decode(predicted / tiny_bundle.vae.config.scaling_factor).sample
    rgb = np.round(np.clip(decoded.numpy() / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert faces.std() > 0  # random weights still give a non-constant image
    np.testing.assert_array_equal(faces, rgb[..., ::-1])


def test_batch_sizes_must_match(tiny_bundle):
    latents, audio = _inputs(tiny_bundle)
    with pytest.raises(ValueError):
        generate_faces(tiny_bundle, latents, audio[:1])
