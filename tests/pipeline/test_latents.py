"""VAE-encode phase: crop and squash, the masked lower half, and deterministic latents."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from musetalk_service.pipeline.latents import crop_faces, encode_faces, vae_inputs


def _frames(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 120, 160, 3), dtype=np.uint8)


def test_crop_is_the_box_squashed_to_256_with_lanczos():
    frames = _frames()
    boxes = [(10, 20, 110, 70), (0, 0, 160, 120)]  # 100x50 is stretched, not padded
    faces = crop_faces(frames, boxes)
    assert faces.shape == (2, 256, 256, 3) and faces.dtype == np.uint8
    expected = cv2.resize(frames[0, 20:70, 10:110], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(faces[0], expected)


def test_lower_half_of_the_masked_copy_is_minus_one():
    faces = np.random.default_rng(1).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    faces[0, :, :] = (255, 128, 0)  # BGR
    masked, reference = vae_inputs(faces)
    assert masked.shape == reference.shape == (3, 3, 256, 256) and masked.dtype == torch.float32
    assert torch.all(masked[:, :, 128:, :] == -1.0)
    assert torch.equal(masked[:, :, :128, :], reference[:, :, :128, :])
    # RGB order, [0, 255] -> [-1, 1].
    assert torch.allclose(reference[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert reference.min() >= -1.0 and reference.max() <= 1.0


def test_latents_are_the_posterior_mean(tiny_bundle):
    frames = _frames(3)
    boxes = [(10, 20, 110, 100), (30, 10, 90, 110), (0, 0, 160, 120)]
    latents = encode_faces(tiny_bundle, frames, boxes)
    assert latents.shape == (3, 8, 32, 32) and latents.dtype == tiny_bundle.dtype
    # Deterministic: the mean, not a sample.
    assert torch.equal(latents, encode_faces(tiny_bundle, frames, boxes))
    masked, reference = vae_inputs(crop_faces(frames, boxes))
    with torch.inference_mode():
        posterior = tiny_bundle.vae.encode(torch.cat([masked, reference])).latent_dist
    scale = tiny_bundle.vae.config.scaling_factor
    torch.testing.assert_close(latents[:, :4], posterior.mean[:3] * scale)
    torch.testing.assert_close(latents[:, 4:], posterior.mean[3:] * scale)
