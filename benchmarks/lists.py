"""Realistic parameter lists (shapes only; tensors are made on demand).

* resnet34: the real ResNet-34 architecture with a binary head: 110 tensors, 21.28M params.
* aasist: an AASIST-sized list: ~400 small tensors, ~300k params (sinc front end, residual
  2-D conv blocks with BatchNorm, graph attention layers, small heads).
* vit_b: a ViT-B/16-like list: ~150 tensors, ~86M params.
"""
import torch


def resnet34_shapes(num_classes=2):
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1 weight/bias
    cin = 64
    for cout, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            shapes += [(cout, cin if b == 0 else cout, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if b == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def aasist_shapes():
    shapes = [(70, 1, 129)]  # sinc filters (learnable variant)
    chans = [1, 32, 32, 64, 64, 64, 64]
    for cin, cout in zip(chans[:-1], chans[1:]):  # six residual blocks
        shapes += [(cin,), (cin,), (cout, cin, 2, 3), (cout,), (cout,), (cout,), (cout, cout, 2, 3), (cout,)]
        if cin != cout:
            shapes += [(cout, cin, 1, 3), (cout,)]
    for _ in range(4):  # graph attention + pooling layers, each with small projections
        shapes += [(64, 64), (64,), (64, 64), (64,), (64, 1), (64, 64), (64,), (64,), (64,), (64, 1), (1,)]
    for _ in range(2):  # heterogeneous graph layers
        shapes += [(32, 64), (32,), (32, 32), (32,), (32, 1), (32, 1), (32, 32), (32,), (32,), (32,)]
    shapes += [(1, 32), (1, 32), (5 * 32, 2), (2,)]
    # the many tiny tensors (per-node attention vectors, norms) that make AASIST launch-bound
    while len(shapes) < 400:
        i = len(shapes)
        shapes.append((16 + (i * 7) % 48,) if i % 2 else (8 + i % 24, 4))
    return shapes


def vit_b_shapes(depth=12, dim=768, mlp=3072, patch=16, num_classes=2):
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, 197, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    shapes += [(dim,), (dim,), (num_classes, dim), (num_classes,)]
    return shapes


def tiny_shapes():
    """A few small tensors: exercises every code path in seconds (tests, --quick)."""
    return [(3,), (5, 4), (), (0,), (257,), (2, 3, 3, 3)]


LISTS = {"resnet34": resnet34_shapes, "aasist": aasist_shapes, "vit_b": vit_b_shapes, "tiny": tiny_shapes}


def numel(shapes):
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def make(shapes, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype) for s in shapes]
