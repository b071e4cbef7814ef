import pytest
import torch
from torch import nn

from resvae.blocks import BLOCKS, SHORTCUTS, make_shortcut, make_stage

CASES = [  # (in_ch, planes, stride)
    (8, 8, 1),    # shape kept (basic) / channels change (bottleneck: out = 4*planes)
    (8, 4, 1),
    (8, 16, 2),
]


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("up", [False, True])
@pytest.mark.parametrize("in_ch,planes,stride", CASES)
@pytest.mark.parametrize("preact", [False, True])
def test_block_shapes_and_shortcut_placement(block, shortcut, up, in_ch, planes, stride, preact):
    cls = BLOCKS[block]
    out_ch = planes * cls.expansion
    stage = make_stage(in_ch, planes, 2, stride, block=cls, up=up, shortcut=shortcut, preact=preact)
    x = torch.randn(2, in_ch, 8, 8)
    y = stage(x)
    size = 8 if stride == 1 else (16 if up else 4)
    assert y.shape == (2, out_ch, size, size)

    first, second = stage[0].shortcut, stage[1].shortcut
    shape_changes = stride != 1 or in_ch != out_ch
    if shortcut == "none":
        assert first is None and second is None
    elif shortcut == "projection":
        assert not isinstance(first, nn.Identity) and not isinstance(second, nn.Identity)
    else:  # identity where shape is unchanged, projection exactly where it changes
        assert isinstance(second, nn.Identity)
        assert isinstance(first, nn.Identity) != shape_changes
    if first is not None and not isinstance(first, nn.Identity):
        assert first(x).shape == y.shape


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
