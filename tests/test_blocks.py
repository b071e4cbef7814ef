import pytest
import torch
from torch import nn

from resvae.blocks import BLOCKS, SHORTCUTS, last_conv, make_shortcut, make_stage

CASES = [  # (in_ch, planes, stride)
    (8, 8, 1),    # shape kept (basic) / channels change (bottleneck: out = 4*planes)
    (8, 4, 1),
    (8, 16, 2),
]
RESAMPLE = {"down": (False, "transposed"), "up": (True, "transposed"),
            "up-nearest": (True, "nearest")}  # (up, upsample)


def _check_projection(sc, in_ch, out_ch, preact):
    """A projection W_s x is a 1x1 conv (after an Upsample for 'nearest'), followed by a BN in
    post-activation blocks and by nothing in pre-activation ones."""
    if not preact:
        assert isinstance(sc, nn.Sequential) and len(sc) == 2 and isinstance(sc[1], nn.BatchNorm2d)
        sc = sc[0]
    conv = last_conv(sc)
    assert isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)), sc
    assert conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (in_ch, out_ch)


def _zero_branch(blk):
    # The branch's last op (post-activation: its last norm; pre-activation: its last conv) -> 0,
    # so the block's output is the shortcut path alone.
    last = blk.conv2 if isinstance(blk, BLOCKS["basic"]) else blk.conv3
    norm = blk.norm2 if isinstance(blk, BLOCKS["basic"]) else blk.norm3
    with torch.no_grad():
        for p in ((last.weight, last.bias) if blk.preact else (norm.weight, norm.bias)):
            if p is not None:
                p.zero_()


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("resample", sorted(RESAMPLE))
@pytest.mark.parametrize("in_ch,planes,stride", CASES)
@pytest.mark.parametrize("preact", [False, True])
def test_shortcut_placement_and_block_is_branch_plus_shortcut(block, shortcut, resample, in_ch,
                                                              planes, stride, preact):
    cls = BLOCKS[block]
    up, upsample = RESAMPLE[resample]
    out_ch = planes * cls.expansion
    stage = make_stage(in_ch, planes, 2, stride, block=cls, up=up, shortcut=shortcut,
                       preact=preact, upsample=upsample)
    x = torch.randn(2, in_ch, 8, 8)
    y = stage(x)
    size = 8 if stride == 1 else (16 if up else 4)
    assert y.shape == (2, out_ch, size, size)

    h, ch = x, in_ch
    for i, blk in enumerate(stage):  # block 0 may change shape; block 1 never does
        sc = blk.shortcut
        shape_changes = i == 0 and (stride != 1 or in_ch != out_ch)
        if shortcut == "none":
            assert sc is None
        elif shortcut == "identity" and not shape_changes:
            assert isinstance(sc, nn.Identity)
        else:  # "projection" everywhere, "identity" exactly where the shape changes
            _check_projection(sc, ch, out_ch, preact)

        # The block computes act(branch(h) + shortcut(h)) (post-activation) or
        # branch(h) + shortcut(pre-activated h) (pre-activation, identity on the raw h):
        # with the branch zeroed, only the shortcut path is left.
        out = blk(h)
        _zero_branch(blk)
        with torch.no_grad():
            if sc is None:
                path = torch.zeros_like(out)
            elif isinstance(sc, nn.Identity):
                path = h
            else:
                path = sc(blk.act(blk.norm1(h)) if preact else h)
            zeroed = blk(h)
        torch.testing.assert_close(zeroed, path if preact else blk.act(path))
        assert not torch.allclose(out, zeroed)  # and the branch did contribute before
        h, ch = out.detach(), out_ch


@pytest.mark.parametrize("upsample,kind", [("transposed", nn.ConvTranspose2d), ("nearest", nn.Upsample)])
def test_up_block_uses_requested_upsampling(upsample, kind):
    stage = make_stage(8, 4, 1, 2, block=BLOCKS["bottleneck"], up=True, upsample=upsample,
                       stride_in_1x1=True)
    assert any(isinstance(m, kind) for m in stage.modules())
    assert stage(torch.randn(1, 8, 4, 4)).shape == (1, 16, 8, 8)


def test_transposed_1x1_stride2_doubles_size():
    sc = make_shortcut(4, 8, 2, up=True, mode="identity", norm=nn.BatchNorm2d)
    conv = sc[0]
    assert isinstance(conv, nn.ConvTranspose2d) and conv.kernel_size == (1, 1)
    assert conv.output_padding == (1, 1)
    assert sc(torch.randn(1, 4, 5, 5)).shape == (1, 8, 10, 10)


def test_plain_block_has_no_shortcut_path():
    # With shortcut 'none' the output must not depend on the identity: zeroing the branch's last
    # norm gives exactly relu(0) = 0, while the residual block passes its input through.
    cls = BLOCKS["basic"]
    x = torch.rand(1, 4, 6, 6)
    plain = make_stage(4, 4, 1, 1, block=cls, shortcut="none")
    resid = make_stage(4, 4, 1, 1, block=cls, shortcut="identity")
    for s in (plain, resid):
        s[0].zero_init_last()
        s.eval()
    assert plain(x).abs().max() == 0
    torch.testing.assert_close(resid(x), x)  # relu(x) == x for x >= 0


def test_unknown_shortcut_is_an_error():
    with pytest.raises(ValueError, match="shortcut"):
        make_shortcut(4, 8, 1, up=False, mode="skip", norm=nn.BatchNorm2d)
