"""The patch prior's construction (models/patches.py): the grid, the positions, the assembly, and
conditional training."""

from __future__ import annotations

import pytest
import torch

from diffpost.models.denoisers import VDenoiser
from diffpost.models.networks import UNet
from diffpost.models.patches import (
    PatchDenoiser,
    PatchNetwork,
    coordinate_maps,
    grid_shift,
    patch_count,
    patch_starts,
    random_patches,
)
from diffpost.models.schedules import VP
from diffpost.models.training import train

SCHEDULE = VP("cosine")


class _Probe(PatchNetwork):
    """A patch 'network' whose Tweedie mean (through VDenoiser) is a known function of its
    inputs: the noisy patch itself (``"echo"``) or the row coordinate channel (``"rows"``)."""

    def __init__(self, what: str, patch_size: int = 8):
        super().__init__(
            UNet(base_channels=8, channel_multipliers=(1,), condition_channels=2), patch_size
        )
        self.what = what

    def forward(self, x, t, positions):
        alpha, sigma = (v[:, None, None, None] for v in SCHEDULE(t))
        target = x if self.what == "echo" else coordinate_maps(positions, self.patch_size)[:, :1]
        return (alpha * x - target) / sigma  # v such that alpha x - sigma v = target


def _denoiser(what: str, patch_size: int = 8, **kwargs) -> PatchDenoiser:
    return PatchDenoiser(VDenoiser(_Probe(what, patch_size), SCHEDULE), **kwargs)


def test_coordinate_maps_are_the_pixel_centres_in_the_whole_image():
    maps = coordinate_maps(torch.tensor([[2.0, 5.0, 10.0, 20.0]]), 4)
    assert maps.shape == (1, 2, 4, 4)
    torch.testing.assert_close(maps[0, 0, :, 0], 2 * (torch.arange(2, 6) + 0.5) / 10 - 1)
    torch.testing.assert_close(maps[0, 1, 0], 2 * (torch.arange(5, 9) + 0.5) / 20 - 1)
    assert (maps[0, 0] == maps[0, 0, :, :1]).all() and (maps[0, 1] == maps[0, 1, :1]).all()


@pytest.mark.parametrize("size", [8, 9, 15, 16, 17, 40, 256])
def test_every_pixel_belongs_to_one_patch_of_every_shifted_grid(size):
    for shift in range(8):
        starts, owner, offset = patch_starts(size, 8, shift)
        assert (starts >= 0).all() and (starts <= size - 8).all()
        assert ((offset >= 0) & (offset < 8)).all()
        assert torch.equal(starts[owner] + offset, torch.arange(size))
        assert len(starts) ** 2 <= patch_count(size, size, 8)
    assert max(len(patch_starts(size, 8, s)[0]) for s in range(8)) ** 2 == patch_count(
        size, size, 8
    )


def test_the_shift_is_a_function_of_the_level_and_varies_between_levels():
    levels = torch.linspace(1e-3, 1.0, 200)
    shifts = [grid_shift(float(t), 16) for t in levels]
    assert shifts == [grid_shift(float(t), 16) for t in levels]
    assert all(0 <= a < 16 and 0 <= b < 16 for a, b in shifts)
    # 200 hashed levels over 256 shifts: a uniform draw would give about 137 distinct values
    assert len(set(shifts)) > 100
    assert sum(a == b for a, b in zip(shifts, shifts[1:], strict=False)) < 5


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 1, 37, 50), (2, 2, 19, 24)])
def test_assembly_puts_each_denoised_patch_back_where_it_came_from(shape):
    x = torch.randn(shape, dtype=torch.float64)
    echo = _denoiser("echo", patch_batch=7).double()
    for t in (0.3, 0.71, torch.tensor([0.2, 0.6] + [0.2] * (shape[0] - 2), dtype=torch.float64)):
        torch.testing.assert_close(echo(x, t), x, rtol=0, atol=1e-12)
    rows = _denoiser("rows").double()(x[:, :1], 0.45)
    expected = 2 * (torch.arange(shape[2], dtype=torch.float64) + 0.5) / shape[2] - 1
    torch.testing.assert_close(rows, expected[:, None].expand(shape[0], 1, *shape[2:]))


def test_chunks_and_per_particle_levels_give_the_per_call_result():
    torch.manual_seed(0)
    net = PatchNetwork(UNet(base_channels=8, channel_multipliers=(1, 2), condition_channels=2), 8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    whole = PatchDenoiser(VDenoiser(net, SCHEDULE), patch_batch=4096)
    chunked = PatchDenoiser(VDenoiser(net, SCHEDULE), patch_batch=5)
    x = torch.randn(3, 1, 20, 28)
    torch.testing.assert_close(chunked(x, 0.4), whole(x, 0.4), rtol=1e-5, atol=1e-6)
    t = torch.tensor([0.4, 0.8, 0.4])
    mixed = whole(x, t)
    for i in range(3):
        torch.testing.assert_close(mixed[i], whole(x[i : i + 1], float(t[i]))[0])
    assert not torch.allclose(
        whole(x, 0.4), PatchDenoiser(VDenoiser(net, SCHEDULE), shifts="none")(x, 0.4)
    )


def test_gradients_flow_through_the_assembly():
    x = torch.randn(2, 1, 19, 21, dtype=torch.float64, requires_grad=True)
    weights = torch.randn_like(x)
    (_denoiser("echo").double()(x, 0.5) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="patch_denoiser"):
        PatchDenoiser(VDenoiser(UNet(), SCHEDULE))
    with pytest.raises(ValueError, match="patch_batch"):
        _denoiser("echo", patch_batch=0)
    with pytest.raises(ValueError, match="shifts"):
        _denoiser("echo", shifts="random")
    with pytest.raises(ValueError, match="H, W >= 8"):
        _denoiser("echo")(torch.zeros(1, 1, 7, 20), 0.5)
    with pytest.raises(ValueError, match="condition_channels=2"):
        PatchNetwork(UNet(), 8)
    with pytest.raises(ValueError, match="condition channels"):
        UNet(condition_channels=2)(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="condition_channels"):
        UNet(condition_channels=-1)


def test_random_patches_carry_their_positions_in_the_transformed_image():
    image = torch.arange(20 * 30, dtype=torch.float64).reshape(1, 20, 30)
    patches, positions = random_patches([image], 500, 6, seed=3)
    assert patches.shape == (500, 1, 6, 6) and positions.shape == (500, 4)
    for patch, (top, left, height, width) in zip(patches[:50], positions[:50].long(), strict=True):
        variant = next(  # the flip or rotation of the image this patch was cut from
            v
            for k in range(4)
            for v in (torch.rot90(image, k, (-2, -1)), torch.rot90(image, k, (-2, -1)).flip(-1))
            if tuple(v.shape[-2:]) == (height, width)
            and torch.equal(v[:, top : top + 6, left : left + 6], patch)
        )
        assert variant is not None
    assert set(positions[:, 2].long().tolist()) == {20, 30}  # both orientations drawn
    plain, where = random_patches([image], 50, 6, seed=3, dihedral=False)
    for patch, (top, left, _, _) in zip(plain, where.long(), strict=True):
        assert torch.equal(image[:, top : top + 6, left : left + 6], patch)


def test_conditional_training_reaches_the_network_and_is_checked():
    patches, positions = random_patches([torch.randn(1, 24, 24)], 64, 8, seed=0)
    denoiser = VDenoiser(
        PatchNetwork(UNet(base_channels=8, channel_multipliers=(1,), condition_channels=2), 8),
        SCHEDULE,
    )
    result = train(
        denoiser, patches, conditions=positions, num_steps=3, batch_size=8, progress=False
    )
    assert torch.isfinite(result.losses).all() and result.losses.shape == (3,)
    with pytest.raises(ValueError, match="conditions must be a tensor with one row per example"):
        train(denoiser, patches, conditions=positions[:10], num_steps=1, progress=False)
