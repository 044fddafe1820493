"""Receptive field from the ONNX graph, against values computed by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from visionserve.export.receptive_field import UnsupportedGraph, receptive_field
from visionserve.server.model_config import ReceptiveField

torch = pytest.importorskip("torch")

from visionserve.export.models import build_model  # noqa: E402
from visionserve.export.onnx_export import onnx_from_module, size_multiple_of  # noqa: E402


def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out_rank: int = 4) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    dims = ["N", "C", "h", "w"][:out_rank]
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, "g", [image], [out],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(name: str, x: str, k: int, s: int = 1, d: int = 1, pad: int | None = None) -> onnx.NodeProto:
    pad = (k - 1) * d // 2 if pad is None else pad
    return helper.make_node("Conv", [x, f"{name}_w"], [name], kernel_shape=[k, k], strides=[s, s],
                            dilations=[d, d], pads=[pad] * 4)


def _weights(*names: str, k: int = 3) -> dict[str, np.ndarray]:
    return {f"{n}_w": np.ones((3, 3, k, k), np.float32) for n in names}


def test_three_stacked_3x3_convolutions_see_7_pixels() -> None:
    model = _graph([_conv("a", "image", 3), _conv("b", "a", 3), _conv("c", "b", 3)],
                   _weights("a", "b", "c"))
    assert receptive_field(model) == ReceptiveField(size=7, radius=3, stride=1)


def test_stem_7x7_stride_2_conv_and_3x3_stride_2_max_pool() -> None:
    # 7 + (3 - 1) * 2 = 11 pixels; stride 2 * 2 = 4
    nodes = [_conv("stem", "image", 7, s=2),
             helper.make_node("MaxPool", ["stem"], ["pool"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    assert receptive_field(_graph(nodes, _weights("stem", k=7))) == ReceptiveField(11, 5, 4)


def test_dilation_and_nearest_upsampling() -> None:
    # dilated 3x3 (d=2) sees 5; a stride-2 conv then x2 nearest upsampling back to stride 1
    nodes = [_conv("dil", "image", 3, d=2), _conv("down", "dil", 3, s=2),
             helper.make_node("Resize", ["down", "", "scales"], ["up"], mode="nearest")]
    inits = _weights("dil", "down") | {"scales": np.array([1, 1, 2, 2], np.float32)}
    field = receptive_field(_graph(nodes, inits))
    # dil: [-2, 2]; down (3x3 at stride 1, output stride 2): [-3, 3]; nearest x2: within
    # one source pixel (2 input pixels) either side: [-5, 5]
    assert field == ReceptiveField(size=11, radius=5, stride=2)


@pytest.mark.parametrize(("kernel", "stride", "expected"), [
    # conv [-1, 1]; pool 2/2 [-1, 2] at J=2; conv [-3, 4]; unpool: values and indices
    # [-3, 4], back (k - 1) * J = 1: [-4, 4] at J=1; conv [-5, 5]
    (2, 2, ReceptiveField(11, 5, 2)),
    # overlapping windows: pool 3/2 [-1, 3]; conv [-3, 5]; unpool back 2: [-5, 5]; conv [-6, 6]
    (3, 2, ReceptiveField(13, 6, 2)),
])
def test_max_unpooling_as_exported_and_as_rewritten(kernel: int, stride: int,
                                                    expected: ReceptiveField) -> None:
    """MaxPool indices and MaxUnpool read as ONNX ops and, after the TensorRT rewrite, as
    its indices subgraph and ScatterElements: the same field."""
    from visionserve.export.pooling_rewrite import rewrite_pooling

    pool = dict(kernel_shape=[kernel, kernel], strides=[stride, stride])
    nodes = [_conv("a", "image", 3),
             helper.make_node("MaxPool", ["a"], ["p", "i"], **pool),
             _conv("b", "p", 3),
             helper.make_node("Shape", ["a"], ["s"]),
             helper.make_node("MaxUnpool", ["b", "i", "s"], ["u"], **pool),
             _conv("c", "u", 3)]
    model = _graph(nodes, _weights("a", "b", "c"))
    assert receptive_field(model) == expected
    rewritten, count = rewrite_pooling(model)
    assert count == 2 and "ScatterElements" in {n.op_type for n in rewritten.graph.node}
    assert receptive_field(rewritten) == expected


def test_a_spatial_reshape_is_named() -> None:
    nodes = [_conv("a", "image", 3),
             helper.make_node("Reshape", ["a", "shape"], ["r"])]
    model = _graph(nodes, _weights("a") | {"shape": np.array([0, 3, -1, 2], np.int64)})
    with pytest.raises(UnsupportedGraph, match="Reshape"):
        receptive_field(model)


def test_resnet18_sees_435_pixels() -> None:
    """The published ResNet-18 receptive field: 435 px, output stride 32."""
    proto = onnx_from_module(build_model("resnet18", num_classes=10), "classification",
                             height=64, width=64)
    assert receptive_field(proto) == ReceptiveField(size=435, radius=217, stride=32)


@pytest.mark.parametrize(
    ("architecture", "depth", "expected"),
    [
        # depth 3, by hand: encoder +-2, pool, +-4, pool, +-8, pool, bottleneck +-16 ->
        # [-30, 37] at stride 8; up (half a stride back) and decoders: [-51, 51]
        ("unet", 3, ReceptiveField(103, 51, 8)),
        ("unet", 2, ReceptiveField(47, 23, 4)),
        # SegNet: see test_zoo_segnet_by_hand
        ("segnet", 3, ReceptiveField(103, 51, 8)),
        ("segnet", 2, ReceptiveField(47, 23, 4)),
    ],
)
def test_zoo_segmenters(architecture: str, depth: int, expected: ReceptiveField) -> None:
    model = build_model(architecture, num_classes=3, base_channels=4, depth=depth)
    proto = onnx_from_module(model, "segmentation", height=32, width=32,
                             size_multiple=size_multiple_of(model))
    assert receptive_field(proto) == expected


@pytest.mark.parametrize("architecture", ["unet", "segnet"])
def test_radius_bounds_what_an_output_pixel_depends_on(architecture: str) -> None:
    """Changing an input pixel just outside the radius leaves the output pixel unchanged;
    inside it, some change shows (random weights, logits output). For the SegNet the change
    travels through the pooling indices too (an argmax moves)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(architecture, num_classes=3, base_channels=4, depth=2).eval()
    proto = onnx_from_module(model, "segmentation", height=64, width=64,
                             size_multiple=size_multiple_of(model), with_logits=True)
    radius = receptive_field(proto).radius
    assert radius == 23
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, 128, 128)).astype(np.float32)
    base = session.run(["logits"], {"image": x})[0]
    centre = 64

    def changed(offset: int) -> bool:
        y = x.copy()
        y[0, :, centre, centre + offset] += 10.0
        return not np.array_equal(session.run(["logits"], {"image": y})[0][0, :, centre, centre], base[0, :, centre, centre])

    assert not changed(radius + 1) and not changed(-radius - 1)
    assert any(changed(o) for o in (radius - 3, radius - 2, radius - 1, radius))


def _segmentation_proto(architecture: str, size: int = 32, **kwargs: object) -> onnx.ModelProto:
    model = build_model(architecture, num_classes=3, **kwargs)
    return onnx_from_module(model, "segmentation", height=size, width=size,
                            size_multiple=size_multiple_of(model))


def test_zoo_segnet_by_hand() -> None:
    """The zoo ``segnet`` (depth 3), exported through the ONNX pooling rewrite, by hand.

    Notation: a tensor at jump ``J`` (its stride in input pixels) spans ``[lo, hi]``: its
    position ``o`` reads input pixels ``o*J + lo .. o*J + hi``. A 3x3 conv (pad 1) adds
    ``-J, +J``; a 2x2 stride-2 max pool adds ``0, +J`` and doubles ``J``. Unpooling onto a
    plane at jump ``J`` (kernel 2, stride 2, no pad) takes the span of its values united
    with its indices' (the pool's window, on the pooled grid) and adds ``-J, 0``: an output
    pixel reads its pooled pixel ``u // 2``, which lies 0 or 1 plane pixels back, and through
    the index that pooled pixel's 2x2 window of pre-pool activations.

    encoder 1: 2 convs at J=1        [-2, 2]           (skip 1)
    pool 1:                          [-2, 3]   J=2     (indices 1: the same window)
    encoder 2: 2 convs at J=2        [-6, 7]           (skip 2)
    pool 2:                          [-6, 9]   J=4
    encoder 3: 2 convs at J=4        [-14, 17]         (skip 3)
    pool 3:                          [-14, 21] J=8
    bottleneck: 2 convs at J=8       [-30, 37]
    unpool 3: [-30, 37] u [-14, 21], -4: [-34, 37] J=4; concat skip 3 [-14, 17]: [-34, 37]
    decoder 3: 2 convs at J=4        [-42, 45]
    unpool 2: [-42, 45] u [-6, 9], -2:   [-44, 45] J=2; decoder 2 (+-4): [-48, 49]
    unpool 1: [-48, 49] u [-2, 3], -1:   [-49, 49] J=1; decoder 1 (+-2): [-51, 51]
    head 1x1:                        [-51, 51]

    103 px, radius 51, output stride 8: the UNet's (its 2x2 stride-2 ConvTranspose also
    adds ``-J, 0``). Depth 2: [-2, 2], [-2, 3], [-6, 7], [-6, 9], bottleneck [-14, 17] at
    J=4, unpool [-16, 17], decoder [-20, 21], unpool [-21, 21], decoder [-23, 23]: 47 px,
    radius 23, stride 4 (``test_zoo_segmenters``).
    """
    proto = _segmentation_proto("segnet", base_channels=4, depth=3)
    assert "ScatterND" in {n.op_type for n in proto.graph.node}  # the rewritten graph is read
    assert receptive_field(proto) == ReceptiveField(size=103, radius=51, stride=8)


def test_segnet_vgg16_bn_by_hand() -> None:
    """SegNet on VGG-16-BN (5 stages of 2, 2, 3, 3, 3 convs, each closed by a 2x2 stride-2
    pool with indices; decoder stages of 3, 3, 3, 2, 1 convs after each unpool, then the 3x3
    head), notation as in ``test_zoo_segnet_by_hand``:

    stage 1: 2 convs at J=1    [-2, 2];      pool [-2, 3]      J=2
    stage 2: 2 convs at J=2    [-6, 7];      pool [-6, 9]      J=4
    stage 3: 3 convs at J=4    [-18, 21];    pool [-18, 25]    J=8
    stage 4: 3 convs at J=8    [-42, 49];    pool [-42, 57]    J=16
    stage 5: 3 convs at J=16   [-90, 105] (conv5_3: 196 px, as published);
             pool [-90, 121] J=32 (pool5: 212 px, as published)
    unpool 5: [-90, 121] (values and indices alike), -16: [-106, 121] J=16;
              3 convs (+-48): [-154, 169]
    unpool 4: [-154, 169] u [-42, 57], -8:  [-162, 169] J=8;  3 convs (+-24): [-186, 193]
    unpool 3: [-186, 193] u [-18, 25], -4:  [-190, 193] J=4;  3 convs (+-12): [-202, 205]
    unpool 2: [-202, 205] u [-6, 9], -2:    [-204, 205] J=2;  2 convs (+-4):  [-208, 209]
    unpool 1: [-208, 209] u [-2, 3], -1:    [-209, 209] J=1;  1 conv + 3x3 head (+-2): [-211, 211]

    423 px, radius 211, output stride 32.
    """
    proto = _segmentation_proto("segnet_vgg16_bn", width=4)
    assert receptive_field(proto) == ReceptiveField(size=423, radius=211, stride=32)


@pytest.mark.parametrize(("pool_size", "size"), [(1, 64), (7, 224)])
def test_vgg16_bn_classifier_sees_pool5(pool_size: int, size: int) -> None:
    """VGG-16-BN: conv5_3 sees [-90, 105] (196 px), pool5 [-90, 121] at stride 32 (212 px;
    both as published; see ``test_segnet_vgg16_bn_by_hand``). The head adds nothing: with
    ``pool_size=1`` the graph has GlobalAveragePool, where the spans end; torchvision's
    default ``AdaptiveAvgPool2d(7)`` on a 224 input (7x7 after pool5) exports as an
    AveragePool of kernel 1, then Flatten. So 212 px, output stride 32; the radius is the
    larger side, 121 (2x2 pools without padding read ahead, not back). A larger input would
    make that AveragePool's kernel larger and the field with it (448: kernel 2, 244 px).
    """
    model = build_model("vgg16_bn", num_classes=3, pool_size=pool_size, hidden=8)
    proto = onnx_from_module(model, "classification", height=size, width=size)
    ops = {n.op_type for n in proto.graph.node}
    assert ("GlobalAveragePool" if pool_size == 1 else "Flatten") in ops
    assert receptive_field(proto) == ReceptiveField(size=212, radius=121, stride=32)
