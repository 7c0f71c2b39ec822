"""The self-training step of DAFormer / HRDA with CLUDA's contrastive terms.

CLUDA (Vayyat et al., Eq. 6) trains on

    L = l_ce^s + l_ce^t + L_CL^s + L_CL^m + lambda * L_FD

- l_ce^s: cross-entropy of the student on the labelled source crop;
- lambda * L_FD: DAFormer's thing-class feature distance to a frozen ImageNet encoder (source);
- L_CL^s (Eq. 3): pixel InfoNCE on the decoder's fused features of the source crop;
- l_ce^t: cross-entropy on the ClassMix image (DACS, Tranheden et al. 2021; DAFormer, Hoyer et
  al. 2022): half of the source classes pasted onto the target crop, labels = source labels where
  pasted and the EMA teacher's pseudo-labels elsewhere (predicted as DAFormer does, with dropout
  off and BatchNorm on the target batch's statistics); pixel weights: 1 on pasted pixels, Gamma
  (the fraction of target pixels whose teacher confidence exceeds 0.968) on target pixels, 0 in
  the ignored top / bottom rows; the mixed image colour-jittered and blurred;
- L_CL^m (Eq. 4-5): pixel InfoNCE on the mixed image's fused features with the same labels and
  weights.

With HRDA (Hoyer et al., ECCV 2022) each crop goes through the multi-resolution forward: the CE is
0.9 x CE of the attention-fused logits + 0.1 x CE of the HR detail crop's logits, pseudo-labels
come from the teacher's LR + sliding-window HR inference, and the CL terms are CLUDA-MR (Eq. 7):
LR and HR features in one InfoNCE call, weights delta / 1 - delta from the feature-weight head
("weighted"), all 1 ("lr+hr") or LR features only ("lr"). The HR detail crop of the mixed image
is random, or where the teacher's prediction entropy is highest (CLUDA appendix 7.4).

MIC (Hoyer et al., "MIC: Masked Image Consistency for Context-Enhanced Domain Adaptation", CVPR
2023) adds one more term, `mic.weight` x l_ce^M: the target crop, colour-jittered and blurred
as the mixed image is, then masked with random square blocks (`cluda.masking`), goes through the
student; its cross-entropy is taken against the teacher's pseudo-labels of the *unmasked* target
crop (the same labels the mixed term uses, not recomputed), weighted by their confidence weights
(Gamma, 0 in the ignored margins). With HRDA the masked crop goes through the multi-resolution
forward with a detail crop of its own, drawn at random, and its CE is HRDA's 0.9 / 0.1 mix, as
in the released MIC code. Optionally (`cl_masked`) the CLUDA term is also taken on the masked
crop's fused features with the same labels and weights.

Every term can be switched off, so source-only, DAFormer, DAFormer + CLUDA, HRDA and HRDA + CLUDA
and the paper's ablations are settings of one `UDAStep`. The step returns the loss terms; the
caller sums them and does one backward pass (DAFormer's separate source / mixed backward passes,
which save activation memory, are not reproduced: one backward keeps DistributedDataParallel
simple). The EMA update of the teacher is the caller's too (`cluda.teacher.ema_update`).

Every random choice of a step (HR crop boxes, ClassMix classes, augmentation) is drawn from a
generator seeded by (seed, iteration, rank), so a resumed run repeats them.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from cluda.augment import MixedBatch, class_mix_masks, mix, strong_augment
from cluda.data.labels import IGNORE_INDEX
from cluda.device import step_seed
from cluda.losses import ContrastiveLoss, feature_distance_loss, weighted_cross_entropy
from cluda.masking import mask_images
from cluda.models import HRDA, HRDAOutput, crop, random_crop_box
from cluda.models.hrda import Box
from cluda.models.segmentor import resize_bilinear
from cluda.teacher import pseudo_label

__all__ = ["UDAStep", "StepResult", "TrainForward", "SegOutput", "step_seed", "step_generator",
           "entropy_crop_box", "teacher_mode", "MULTIRES_MODES", "MIX_MODES", "HR_CROP_MODES",
           "TEACHER_BN_MODES"]

MULTIRES_MODES = ("lr", "lr+hr", "weighted")
MIX_MODES = ("class", "none")
TEACHER_BN_MODES = ("batch", "running")
HR_CROP_MODES = ("random", "entropy")


def step_generator(seed: int, it: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one step's random choices."""
    return torch.Generator().manual_seed(step_seed(seed, it, rank))


class SegOutput(NamedTuple):
    """A single-resolution training forward: logits (B, K, h, w), fused (B, C, h, w), the encoder
    feature list."""
    logits: torch.Tensor
    fused: torch.Tensor
    features: List[torch.Tensor]


class TrainForward(nn.Module):
    """The training forward of a `Segmentor` or an `HRDA` as one `forward`, so that
    DistributedDataParallel can wrap it (calling `segmentor.forward_with_features` on a wrapped
    module would bypass the gradient synchronisation).

    Args:
        model: a `cluda.models.Segmentor` or `cluda.models.HRDA`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.is_hrda = isinstance(model, HRDA)

    def forward(self, img: torch.Tensor, *, box: Optional[Box] = None,
                with_delta: bool = True) -> Union[SegOutput, HRDAOutput]:
        """Args:
            img: (B, 3, H, W) training crop.
            box: HRDA's detail box (y1, y2, x1, x2); required for HRDA.
            with_delta: HRDA: return the feature weight delta. Leave it out when no loss uses it,
                so DDP's unused-parameter search does not wait for its gradient.
        """
        if not self.is_hrda:
            return SegOutput(*self.model.forward_with_features(img))
        assert box is not None, "HRDA's training forward needs the detail box"
        out = self.model(img, box=box)
        if not with_delta:
            out.delta = None
        return out


class StepResult(NamedTuple):
    """losses: {term: 0-dim tensor}, only the terms switched on (their sum is the loss).
    stats: {name: float} diagnostics (Gamma, the pasted fraction)."""
    losses: Dict[str, torch.Tensor]
    stats: Dict[str, float]


@torch.no_grad()
def entropy_crop_box(probs: torch.Tensor, crop_size: Sequence[int], *, divisible: int = 8,
                     exclude: Optional[torch.Tensor] = None) -> Box:
    """The detail crop where the mean prediction entropy is highest (CLUDA appendix 7.4).

    Entropy H = -sum_k p_k log p_k per pixel (0 where `exclude`: pasted source pixels, whose labels
    are known), averaged over `divisible` x `divisible` cells and then over every crop-sized window
    of cells, summed over the batch; the best window's top-left corner is a multiple of
    `divisible`, as HRDA needs. Ties go to the top-left-most window.

    Args:
        probs: (B, K, H, W) teacher probabilities at image resolution.
        crop_size: (hc, wc) of the detail crop, multiples of `divisible`.
        divisible: corner alignment.
        exclude: optional (B, H, W) bool mask of pixels not to count.

    Returns:
        (y1, y2, x1, x2) in pixels.
    """
    hc, wc = (int(s) for s in crop_size)
    h, w = probs.shape[-2:]
    assert hc % divisible == 0 and wc % divisible == 0 and hc <= h and wc <= w, \
        f"crop {hc}x{wc} must be a multiple of {divisible} inside the {h}x{w} image"
    p = probs.float().clamp_min(1e-12)
    ent = -(p * p.log()).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    if exclude is not None:
        ent = ent.masked_fill(exclude[:, None].bool(), 0.0)
    cells = F.avg_pool2d(ent, divisible)  # (B, 1, H // d, W // d)
    windows = F.avg_pool2d(cells, (hc // divisible, wc // divisible), stride=1)  # (B, 1, ny, nx)
    score = windows.sum(dim=(0, 1))  # (ny, nx)
    idx = int(torch.argmax(score.flatten()))
    y1, x1 = (idx // score.shape[1]) * divisible, (idx % score.shape[1]) * divisible
    return (y1, y1 + hc, x1, x1 + wc)


@contextlib.contextmanager
def teacher_mode(teacher: nn.Module, bn: str = "batch"):
    """The mode the teacher predicts pseudo-labels in.

    "batch" is DAFormer's: dropout and drop path off, but BatchNorm layers in training mode, so
    the target batch is normalised with its own statistics. Their momentum is set to 0 meanwhile,
    so the teacher's running statistics stay the EMA of the student's (DAFormer lets them move;
    here they stay identical across DDP ranks and meaningful in a saved teacher). "running" is
    plain eval mode: those running statistics. The teacher's modes and momenta are restored on
    exit.

    Args:
        teacher: the EMA model.
        bn: "batch" or "running".
    """
    assert bn in TEACHER_BN_MODES, bn
    modes = [(m, m.training) for m in teacher.modules()]
    momenta = []
    for m, _ in modes:
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        m.training = bn == "batch" and is_bn
        if m.training:
            momenta.append((m, m.momentum))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: left as they are
    try:
        yield teacher
    finally:
        for m, was in modes:
            m.training = was
        for m, momentum in momenta:
            m.momentum = momentum


class UDAStep:
    """One training step's losses: source CE / FD / CL, then (after `start_iter`) teacher
    pseudo-labels, ClassMix, strong augmentation, mixed CE / CL, and MIC's masked CE / CL.

    Loss keys (each present only when switched on): "src.ce", "src.fd", "src.cl", "mix.ce",
    "mix.cl", "mic.ce", "mic.cl". CL terms already carry `cl_weight`, FD carries `fd_lambda`,
    the masked CE carries `mic_weight`.

    Args:
        self_training: False: source-only training (no teacher, no target terms).
        start_iter: iterations of source-only warm-up before the target terms start.
        pseudo_threshold: beta of the confidence weight Gamma (0.968).
        ignore_top: rows at the top of each target crop with pseudo-label weight 0.
        ignore_bottom: rows at the bottom with weight 0.
        mix: "class" (ClassMix) or "none" (train on the pseudo-labelled target crop itself).
        jitter_strength: colour jitter strength of the strong augmentation (0.2).
        jitter_p: probability of colour jitter (0.8; 0 switches it off).
        blur_p: probability of gaussian blur (0.5; 0 switches it off).
        blur_sigma: (low, high) range of the blur's sigma.
        fd_lambda: weight of the feature distance (0.005; 0 switches it off).
        contrastive: the CLUDA loss module with its settings, or None (no CL term).
        cl_source: compute L_CL^s.
        cl_mixed: compute L_CL^m (after start_iter).
        cl_weight: multiplies each CL term.
        multires: HRDA only: "lr", "lr+hr" or "weighted" CLUDA-MR.
        hr_crop: HRDA only: the mixed image's detail crop, "random" or "entropy".
        teacher_bn: BatchNorm statistics of the teacher's prediction, "batch" (DAFormer: the
            target batch's own) or "running" (eval mode); see `teacher_mode`.
        mic: add MIC's masked-image consistency term "mic.ce" (after start_iter).
        mic_block_size: side of the masked square blocks in pixels of the training crop (MIC:
            64 for HRDA's full-resolution crops, 32 for DAFormer's half-resolution ones).
        mic_ratio: probability that a block is masked (MIC: 0.7).
        mic_weight: multiplies the masked CE (MIC's lambda^M, 1).
        cl_masked: with `mic` and a contrastive module: also the CL term on the masked crop,
            "mic.cl" (times `cl_weight`).
        seed: the experiment seed of the step generator.
        ignore_index: ignored label value.
    """

    def __init__(self, *, self_training: bool = True, start_iter: int = 0,
                 pseudo_threshold: float = 0.968, ignore_top: int = 0, ignore_bottom: int = 0,
                 mix: str = "class", jitter_strength: float = 0.2, jitter_p: float = 0.8,
                 blur_p: float = 0.5, blur_sigma: Sequence[float] = (0.15, 1.15),
                 fd_lambda: float = 0.0, contrastive: Optional[ContrastiveLoss] = None,
                 cl_source: bool = True, cl_mixed: bool = True, cl_weight: float = 1.0,
                 multires: str = "weighted", hr_crop: str = "random", teacher_bn: str = "batch",
                 mic: bool = False, mic_block_size: int = 64, mic_ratio: float = 0.7,
                 mic_weight: float = 1.0, cl_masked: bool = False, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        # The values come checked from the config (`cluda.config.validate`).
        assert mix in MIX_MODES and multires in MULTIRES_MODES and hr_crop in HR_CROP_MODES \
            and teacher_bn in TEACHER_BN_MODES, (mix, multires, hr_crop, teacher_bn)
        assert min(start_iter, fd_lambda, cl_weight, mic_weight) >= 0 and mic_block_size >= 1 \
            and 0 <= mic_ratio <= 1
        assert mic or not cl_masked, "cl_masked needs mic (the term lives on MIC's masked image)"
        self.self_training = bool(self_training)
        self.start_iter = int(start_iter)
        self.pseudo_threshold = float(pseudo_threshold)
        self.ignore_top, self.ignore_bottom = int(ignore_top), int(ignore_bottom)
        self.mix = mix
        self.jitter_strength, self.jitter_p, self.blur_p = float(jitter_strength), float(jitter_p), float(blur_p)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.fd_lambda = float(fd_lambda)
        self.contrastive = contrastive
        self.cl_source = bool(cl_source) and contrastive is not None
        self.cl_mixed = bool(cl_mixed) and contrastive is not None and self.self_training
        self.cl_weight = float(cl_weight)
        self.multires = multires
        self.hr_crop = hr_crop
        self.teacher_bn = teacher_bn
        self.mic = bool(mic) and self.self_training
        self.mic_block_size, self.mic_ratio = int(mic_block_size), float(mic_ratio)
        self.mic_weight = float(mic_weight)
        self.cl_masked = bool(cl_masked) and contrastive is not None and self.mic
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)

    # -- what runs when ------------------------------------------------------------------------

    def target_active(self, it: int) -> bool:
        """Whether iteration `it` has the target terms (teacher, mixing)."""
        return self.self_training and it >= self.start_iter

    def term_names(self, it: Optional[int] = None) -> List[str]:
        """The loss keys a step returns at iteration `it` (None: at any iteration)."""
        target = self.self_training if it is None else self.target_active(it)
        names = ["src.ce"]
        if self.fd_lambda > 0:
            names.append("src.fd")
        if self.cl_source:
            names.append("src.cl")
        if target:
            names.append("mix.ce")
            if self.cl_mixed:
                names.append("mix.cl")
            if self.mic:
                names.append("mic.ce")
            if self.cl_masked:
                names.append("mic.cl")
        return names

    def uses_delta(self, it: int) -> bool:
        """Whether a loss at iteration `it` reads HRDA's feature weight delta."""
        return self.multires == "weighted" and (
            self.cl_source or ((self.cl_mixed or self.cl_masked) and self.target_active(it)))

    # -- the step ------------------------------------------------------------------------------

    def __call__(self, net: nn.Module, teacher: Optional[nn.Module], source_img: torch.Tensor,
                 source_label: torch.Tensor, target_img: Optional[torch.Tensor], *, it: int,
                 rank: int = 0, imnet: Optional[nn.Module] = None,
                 target_valid: Optional[torch.Tensor] = None) -> StepResult:
        """Loss terms of iteration `it`.

        Args:
            net: `TrainForward` around the student, possibly wrapped in DistributedDataParallel.
            teacher: the EMA teacher (unwrapped, eval mode), needed once the target terms run.
            source_img: (B, 3, H, W) normalised source crops.
            source_label: (B, H, W) integer source labels.
            target_img: (B, 3, H, W) normalised target crops (labels never used).
            it: the iteration (0-based).
            rank: the process rank (a different random stream per process).
            imnet: the frozen ImageNet encoder, needed when fd_lambda > 0.
            target_valid: optional (B, H, W) map, 0 where the target crop's pseudo-labels are not
                trusted (the data set's pseudo-label margins); multiplies their weights.

        Returns:
            StepResult(losses, stats).
        """
        fwd = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        assert isinstance(fwd, TrainForward), type(fwd)
        # source_img (B, 3, H, W), source_label (B, H, W)
        assert source_img.dim() == 4 and source_label.shape[-2:] == source_img.shape[-2:]
        hrda: Optional[HRDA] = fwd.model if fwd.is_hrda else None
        gen = step_generator(self.seed, it, rank)
        with_delta = self.uses_delta(it)
        losses: Dict[str, torch.Tensor] = {}
        stats: Dict[str, float] = {}

        # ---- source: CE, FD, L_CL^s ----
        box = None
        if hrda is not None:
            box = random_crop_box(*source_img.shape[-2:], hrda.hr_crop_size,
                                  divisible=hrda.crop_divisible, generator=gen)
        out = net(source_img, box=box, with_delta=with_delta)
        losses["src.ce"] = self._ce(out, source_label, None, hrda)
        if self.fd_lambda > 0:
            assert imnet is not None, "fd_lambda > 0 needs the frozen ImageNet encoder (imnet)"
            losses["src.fd"] = self._fd(out, source_img, source_label, imnet, hrda)
        if self.cl_source:
            losses["src.cl"] = self.cl_weight * self._cl(out, source_label, None, hrda)

        if not self.target_active(it):
            return StepResult(losses, stats)
        assert teacher is not None and target_img is not None, \
            f"iteration {it} runs self-training: teacher and target_img are needed"
        assert target_img.shape == source_img.shape, (target_img.shape, source_img.shape)

        pl, t_logits = self.pseudo_labels(teacher, target_img, valid=target_valid)
        stats["gamma"] = float(pl.gamma)
        mixed, pasted = self.mix_batch(source_img, source_label, target_img, pl, generator=gen)
        stats["pasted"] = float(pasted.float().mean())

        # ---- mixed: CE with pixel weights, L_CL^m ----
        box = None
        if hrda is not None:
            if self.hr_crop == "entropy":
                box = entropy_crop_box(t_logits.float().softmax(dim=1), hrda.hr_crop_size,
                                       divisible=hrda.crop_divisible, exclude=pasted)
            else:
                box = random_crop_box(*mixed.image.shape[-2:], hrda.hr_crop_size,
                                      divisible=hrda.crop_divisible, generator=gen)
        out = net(mixed.image, box=box, with_delta=with_delta)
        losses["mix.ce"] = self._ce(out, mixed.labels, mixed.weights, hrda)
        if self.cl_mixed:
            losses["mix.cl"] = self.cl_weight * self._cl(out, mixed.labels, mixed.weights, hrda)

        # ---- MIC: the masked target crop against the unmasked crop's pseudo-labels ----
        # Drawn after every other choice of the step, so switching MIC on leaves the source,
        # ClassMix and mixed-image draws of a run as they were.
        if self.mic:
            masked = self.masked_image(target_img, generator=gen)
            box = None
            if hrda is not None:
                box = random_crop_box(*masked.shape[-2:], hrda.hr_crop_size,
                                      divisible=hrda.crop_divisible, generator=gen)
            out = net(masked, box=box, with_delta=with_delta and self.cl_masked)
            losses["mic.ce"] = self.mic_weight * self._ce(out, pl.labels, pl.weights, hrda)
            if self.cl_masked:
                losses["mic.cl"] = self.cl_weight * self._cl(out, pl.labels, pl.weights, hrda)
        return StepResult(losses, stats)

    # -- pseudo-labels and mixing (used by __call__; public for inspection) -------------------

    @torch.no_grad()
    def pseudo_labels(self, teacher: nn.Module, target_img: torch.Tensor,
                      valid: Optional[torch.Tensor] = None):
        """The EMA teacher's pseudo-labels of the target crops (HRDA: LR + sliding-window HR
        inference, in `teacher_mode(teacher, self.teacher_bn)`), with Gamma and the zeroed top /
        bottom margins; weights also 0 where `valid` ((B, H, W), optional) is 0. Gamma counts
        every pixel, as DAFormer / HRDA do.

        Returns:
            (PseudoLabels(labels (B, H, W), weights (B, H, W), gamma), teacher logits (B, K, H, W)).
        """
        with teacher_mode(teacher, self.teacher_bn):
            logits = teacher.inference(target_img, mode="whole")  # (B, K, H, W)
        pl = pseudo_label(logits, threshold=self.pseudo_threshold, ignore_top=self.ignore_top,
                          ignore_bottom=self.ignore_bottom)
        if valid is not None:
            assert valid.shape == pl.weights.shape, (valid.shape, pl.weights.shape)
            pl = pl._replace(weights=pl.weights * valid.to(pl.weights))
        return pl, logits

    def mix_batch(self, source_img: torch.Tensor, source_label: torch.Tensor,
                  target_img: torch.Tensor, pl, *, generator: torch.Generator):
        """ClassMix (or no mixing) and the strong augmentation of the mixed image.

        Returns:
            (MixedBatch(augmented image (B, 3, H, W), labels (B, H, W), weights (B, H, W)),
            pasted (B, H, W) bool: where the source was pasted).
        """
        if self.mix == "class":
            masks = class_mix_masks(source_label, generator=generator, ignore_index=self.ignore_index)
            mixed = mix(masks, source_image=source_img, target_image=target_img,
                        source_labels=source_label, pseudo_labels=pl.labels,
                        pseudo_weights=pl.weights)
            pasted = masks[:, 0] > 0.5
        else:
            mixed = MixedBatch(target_img, pl.labels.long(), pl.weights.float())
            pasted = torch.zeros_like(pl.labels, dtype=torch.bool)
        image = strong_augment(mixed.image, generator=generator, jitter_strength=self.jitter_strength,
                               jitter_p=self.jitter_p, blur_p=self.blur_p, blur_sigma=self.blur_sigma)
        return MixedBatch(image, mixed.labels, mixed.weights), pasted

    def masked_image(self, target_img: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """MIC's input: the target crops colour-jittered and blurred (the mixed image's strong
        augmentation, drawn afresh), then masked with random blocks (`cluda.masking`), in that
        order as in the released MIC code, so the block edges stay sharp.

        Returns:
            (B, 3, H, W) normalised masked images.
        """
        image = strong_augment(target_img, generator=generator, jitter_strength=self.jitter_strength,
                               jitter_p=self.jitter_p, blur_p=self.blur_p, blur_sigma=self.blur_sigma)
        return mask_images(image, block_size=self.mic_block_size, ratio=self.mic_ratio,
                           generator=generator)

    # -- terms ---------------------------------------------------------------------------------

    def _ce(self, out, labels, weights, hrda: Optional[HRDA]) -> torch.Tensor:
        """Single resolution: pixel-weighted CE of the logits (upsampled to the labels). HRDA:
        (1 - w_hr) x CE of the fused logits + w_hr x CE of the detail crop's logits."""
        if hrda is None:
            return weighted_cross_entropy(out.logits, labels, weights, ignore_index=self.ignore_index)
        w = hrda.hr_loss_weight
        fused = weighted_cross_entropy(out.logits, labels, weights, ignore_index=self.ignore_index)
        if w == 0:
            return fused
        hr = weighted_cross_entropy(out.hr_logits, crop(labels, out.box),
                                    None if weights is None else crop(weights, out.box),
                                    ignore_index=self.ignore_index)
        return (1 - w) * fused + w * hr

    def _fd(self, out, img, labels, imnet, hrda: Optional[HRDA]) -> torch.Tensor:
        """lambda x L_FD on the last encoder stage (HRDA: of the LR view, as HRDA's default
        feature scale)."""
        if hrda is None:
            feats = out.features[-1]
        else:
            feats = out.lr_features[-1]
            h, w = img.shape[-2:]
            img = resize_bilinear(img, (int(h * hrda.lr_scale), int(w * hrda.lr_scale)))
        with torch.no_grad():
            imnet_feats = imnet(img)[-1]
        return feature_distance_loss(feats, imnet_feats, labels, lam=self.fd_lambda,
                                     ignore_index=self.ignore_index)

    def _cl(self, out, labels, weights, hrda: Optional[HRDA]) -> torch.Tensor:
        """L_CL (Eq. 3 / Eq. 4-5), or CLUDA-MR (Eq. 7) for HRDA."""
        if hrda is None:
            return self.contrastive(out.fused, labels, weights)
        if self.multires == "lr":
            return self.contrastive.multires(out.lr_fused, labels, lr_weights=weights)
        return self.contrastive.multires(
            out.lr_fused, labels, out.hr_fused, crop(labels, out.box),
            boxes=out.lr_box, delta=out.delta if self.multires == "weighted" else None,
            lr_weights=weights, hr_weights=None if weights is None else crop(weights, out.box),
            weighted=self.multires == "weighted")
