"""A BLIP vision tower made from a world retriever's image tower, as the paper's BLIP starts from a pretrained ViT:
the open_clip tower's weights are copied (`raycap.models.blip.blip_vision_state_from_open_clip`), then, because
BLIP's embeddings have no pre-layernorm, the copy is trained to give the retriever tower's outputs (every token
after the final norm, mean squared error) on unlabelled images. Only pixels are read: no reference, no label."""
from __future__ import annotations

import numpy as np
import torch

from raycap.models.blip import blip_vision_config_of, blip_vision_state_from_open_clip
from raycap.progress import progress


@torch.no_grad()
def tower_outputs(visual, pixels: torch.Tensor) -> torch.Tensor:
    """An open_clip ViT tower's every token after its last block and `ln_post`: (B, 1 + patches, width)."""
    x = visual._embeds(pixels)
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x)


def relative_error(student, visual, pixels: torch.Tensor, chunk: int = 256) -> float:
    """Squared error of the student's tokens over the teacher's variance about their mean (0: the same tokens)."""
    err = var = 0.0
    with torch.no_grad():
        for k in range(0, len(pixels), chunk):
            t = tower_outputs(visual, pixels[k:k + chunk])
            s = student(pixel_values=pixels[k:k + chunk]).last_hidden_state
            err += float(((s - t) ** 2).sum())
            var += float(((t - t.mean(dim=(0, 1), keepdim=True)) ** 2).sum())
    return err / max(var, 1e-12)


def blip_vision_from_retriever(retriever, train_images: np.ndarray, val_images: np.ndarray, steps: int = 1000,
                               batch_size: int = 128, lr: float = 3e-4, seed: int = 0):
    """(BlipVisionModel, metrics): the retriever's tower copied into BLIP's, then distilled on `train_images` (uint8
    (N, H, W, 3)) for `steps` Adam steps; metrics hold the relative error on `val_images` before and after."""
    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel

    torch.manual_seed(seed)
    visual = retriever.model.visual.eval()
    student = BlipVisionModel(BlipVisionConfig(**blip_vision_config_of(visual)))
    student.load_state_dict(blip_vision_state_from_open_clip(visual))
    val_pixels = retriever.pixels(val_images)
    before = relative_error(student.eval(), visual, val_pixels)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bar = progress(range(steps), total=steps, desc="BLIP vision")
    for _ in bar:
        student.train()
        b = torch.randint(len(train_images), (batch_size,), generator=gen).numpy()
        pixels = retriever.pixels(train_images[b])
        loss = torch.nn.functional.mse_loss(student(pixel_values=pixels).last_hidden_state,
                                            tower_outputs(visual, pixels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = relative_error(student.eval(), visual, val_pixels)
    return student, {"relative_error_copied": round(before, 5), "relative_error_distilled": round(after, 5),
                     "steps": steps, "train_images": len(train_images), "val_images": len(val_images)}
