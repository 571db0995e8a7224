"""Phase 5 loss and Dice bookkeeping for training with missing annotations.

In NSCLC-Radiomics a structure is often not contoured (the heart in ~70% of patients): its voxels
then carry label 0 although they are not background. For such a sample the cross-entropy is
*marginal* (the unannotated classes' probabilities are merged into background, so an uncontoured
heart is never taught as background) and the soft Dice and the validation Dice skip those classes.
A pixel labelled with an unannotated class cannot occur (phase 2.5 only writes annotated labels).

Shapes: logits ``(N, C, H, W)`` float (any dtype; the loss is computed in float32), target
``(N, H, W)`` int64 labels 0..C-1, annotated ``(N, C)`` bool (column 0, background, is always
treated as annotated), class weights ``(C,)`` float.

    loss = multi_organ_loss(logits, target, annotated, class_weights)   # 0.5 CE + 0.5 Dice
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to numerator and denominator of the soft Dice: a class absent from the batch and
#: (almost) absent from the prediction scores ~1 instead of 0/0.
DICE_SMOOTH = 1.0
CE_WEIGHT = 0.5
DICE_WEIGHT = 0.5


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, c, h, w = logits.shape
    if target.shape != (n, h, w):
        raise ValueError(f"target must be (N, H, W) = {(n, h, w)}, got {tuple(target.shape)}")
    if annotated.shape != (n, c) or annotated.dtype != torch.bool:
        raise ValueError(f"annotated must be bool (N, C) = {(n, c)}, got {annotated.dtype} {tuple(annotated.shape)}")
    annotated = annotated.clone()
    annotated[:, 0] = True  # background is always known
    return annotated


def merge_unannotated_logits(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Logits whose background channel holds ``logsumexp`` of background and the unannotated
    classes, and whose unannotated channels are ``-inf``.

    The softmax of the result gives the merged background the summed probability of the classes
    it absorbs and leaves the annotated foreground probabilities unchanged (the overall
    ``logsumexp`` is the same). ``logits`` (N, C, H, W) float32, ``annotated`` bool (N, C) with
    column 0 True.
    """
    absorbed = ~annotated
    absorbed[:, 0] = True  # channels merged into background: itself + the unannotated ones
    absorbed = absorbed[:, :, None, None]
    background = torch.logsumexp(logits.masked_fill(~absorbed, float("-inf")), dim=1)
    merged = logits.masked_fill(absorbed, float("-inf"))
    return torch.cat([background[:, None], merged[:, 1:]], dim=1)


def marginal_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    annotated: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted cross-entropy with unannotated classes merged into background.

    Weighted mean over pixels, as ``F.cross_entropy(weight=...)``: sum of ``w[target] * nll``
    divided by the sum of ``w[target]``. With every class annotated it equals
    ``F.cross_entropy(logits, target, weight=class_weights)``. Returns a float32 scalar.
    """
    annotated = _check_inputs(logits, target, annotated)
    merged = merge_unannotated_logits(logits.float(), annotated)
    weight = None if class_weights is None else class_weights.to(merged.device, torch.float32)
    return F.cross_entropy(merged, target, weight=weight)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, skipping unannotated (sample, class) pairs.

    Per foreground class c, sums run over the pixels of every sample where c is annotated ("batch Dice"):
    ``dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)``; the loss is
    ``1 - mean_c dice_c`` over the classes annotated in at least one sample (0 when none is).
    ``p`` is the softmax over all classes (identical to that of the merged logits for the
    annotated classes). Returns a float32 scalar.
    """
    annotated = _check_inputs(logits, target, annotated)
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]  # (N, C-1, H, W) foreground
    n_classes = logits.shape[1]
    onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    keep = annotated[:, 1:].to(probs.dtype)  # (N, C-1)
    intersection = ((probs * onehot).sum(dim=(2, 3)) * keep).sum(dim=0)
    denominator = ((probs + onehot).sum(dim=(2, 3)) * keep).sum(dim=0)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = annotated[:, 1:].any(dim=0)
    n_present = present.sum()
    mean_dice = torch.where(present, dice, torch.zeros_like(dice)).sum() / n_present.clamp(min=1)
    return torch.where(n_present > 0, 1 - mean_dice, torch.zeros_like(mean_dice))


def multi_organ_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    annotated: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``0.5 * marginal_cross_entropy + 0.5 * soft_dice_loss``: float32 scalar."""
    return (CE_WEIGHT * marginal_cross_entropy(logits, target, annotated, class_weights)
            + DICE_WEIGHT * soft_dice_loss(logits, target, annotated))


# ---- Hard Dice for validation (accumulated over batches, reduced across processes) -----------
def dice_counts(prediction: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                n_classes: int) -> torch.Tensor:
    """Per-class ``[intersection, predicted, true]`` pixel counts, float64 ``(3, C)``.

    ``prediction`` and ``target`` are (N, H, W) integer labels; a (sample, class) pair whose
    class is unannotated for that sample contributes nothing. Sums over batches (and over
    processes with ``all_reduce``) give the Dice over all validation slices, which is the Dice
    of the stacked volumes, per class.
    """
    n = prediction.shape[0]
    # One confusion matrix per sample from a single bincount: index = (sample, true, predicted).
    index = (torch.arange(n, device=target.device)[:, None, None] * n_classes + target) * n_classes
    confusion = torch.bincount((index + prediction).reshape(-1), minlength=n * n_classes ** 2)
    confusion = confusion.reshape(n, n_classes, n_classes).to(torch.float64)
    keep = annotated.to(torch.float64)  # (N, C)
    inter = torch.diagonal(confusion, dim1=1, dim2=2)
    pred = confusion.sum(dim=1)
    true = confusion.sum(dim=2)
    return torch.stack([(inter * keep).sum(0), (pred * keep).sum(0), (true * keep).sum(0)])


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Dice per class from :func:`dice_counts` sums; NaN where a class was neither predicted nor
    present in any annotated sample (nothing to score)."""
    inter, pred, true = counts.double().cpu()
    denominator = pred + true
    dice = torch.where(denominator > 0, 2 * inter / denominator.clamp(min=1), torch.nan)
    return [float(v) for v in dice]
