"""The selective scan and Mamba blocks against the float64 reference loop."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from matten.ssm import (
    BiMamba,
    Mamba,
    MambaState,
    TokenGrid,
    backend,
    global_to_grid,
    global_to_spatial,
    global_to_temporal,
    grid_to_global,
    selective_scan,
    spatial_to_global,
    temporal_to_global,
)
from matten.ssm.chunked_scan import chunked_scan
from matten.ssm.depthwise_conv import depthwise_conv1d
from matten.ssm.mamba import channels_first_linear
from matten.ssm.reference import selective_scan_ref

# The module, not the function of the same name that matten.ssm exports.
scan_module = importlib.import_module("matten.ssm.selective_scan")


def coefficients(layout, batch, dim, length, nstate, r, groups=2):
    """B or C in one of mamba_ssm's layouts."""
    return {
        "variable": lambda: r(batch, nstate, length),
        "grouped": lambda: r(batch, groups, nstate, length),
        "constant": lambda: r(dim, nstate),
    }[layout]()


def make_inputs(
    batch, dim, length, nstate, seed=0, dtype=torch.float32, B="variable", C="variable", groups=2
):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, length),
        delta=r(batch, dim, length) * 0.5,
        A=-torch.rand(dim, nstate, generator=g, dtype=dtype) * 3,
        B=coefficients(B, batch, dim, length, nstate, r, groups),
        C=coefficients(C, batch, dim, length, nstate, r, groups),
        D=r(dim),
        z=r(batch, dim, length),
        delta_bias=r(dim) * 0.1,
    )


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SHAPES = [(1, 1, 1, 1), (2, 8, 37, 16), (1, 5, 129, 4), (3, 16, 250, 16)]


@pytest.mark.parametrize("batch,dim,length,nstate", SHAPES)
def test_cpu_scan_matches_reference(batch, dim, length, nstate):
    x = make_inputs(batch, dim, length, nstate)
    h0 = torch.randn(batch, dim, nstate)
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, initial_state=h0)
    y_ref, last_ref = selective_scan_ref(
        **x, delta_softplus=True, return_last_state=True, initial_state=h0
    )
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(last, last_ref) < 1e-5


def test_scan_optional_arguments_follow_reference():
    x = make_inputs(2, 4, 33, 8)
    for drop in ["D", "z", "delta_bias"]:
        kwargs = {k: v for k, v in x.items() if k != drop}
        assert rel_err(selective_scan(**kwargs), selective_scan_ref(**kwargs)) < 1e-5


@pytest.mark.parametrize("length,chunk", [(1, None), (37, None), (37, 5), (64, 8), (100, 100)])
def test_chunked_scan_matches_reference(length, chunk):
    x = make_inputs(2, 6, length, 16, dtype=torch.float64)
    delta = F.softplus(x["delta"])
    h0 = torch.randn(2, 6, 16, dtype=torch.float64)
    y, last = chunked_scan(x["u"], delta, x["A"], x["B"], x["C"], h0, chunk=chunk)
    y_ref, last_ref = selective_scan_ref(
        x["u"], delta, x["A"], x["B"], x["C"], return_last_state=True, initial_state=h0
    )
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(last, last_ref) < 1e-12


def test_carried_state_equals_one_long_scan():
    x = make_inputs(1, 4, 40, 16)
    x.pop("z")
    full = selective_scan(**x)
    first = {k: (v[..., :25] if v.dim() == 3 else v) for k, v in x.items()}
    second = {k: (v[..., 25:] if v.dim() == 3 else v) for k, v in x.items()}
    y1, state = selective_scan(**first, return_last_state=True)
    y2 = selective_scan(**second, initial_state=state)
    assert torch.allclose(torch.cat([y1, y2], -1), full, atol=1e-6)


def test_cpu_scan_gradcheck():
    x = make_inputs(2, 3, 7, 4, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = [x[n].clone().requires_grad_() for n in names] + [h0.clone().requires_grad_()]

    def fn(*args):
        y, last = selective_scan(
            *args[:7],
            delta_bias=args[7],
            delta_softplus=True,
            return_last_state=True,
            initial_state=args[8],
        )
        return y, last

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("scan", ["cpu", "chunked"])
def test_float32_gradients_match_reference_autograd(scan):
    x = make_inputs(2, 8, 70, 16)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref_leaves = {k: v.double().clone().requires_grad_() for k, v in x.items()}
    weight = torch.randn(2, 8, 70)
    if scan == "cpu":
        y = selective_scan(**leaves, delta_softplus=True)
    else:  # the device-agnostic path used on GPUs without mamba_ssm
        delta = F.softplus(leaves["delta"] + leaves["delta_bias"][:, None])
        h0 = torch.zeros(2, 8, 16)
        y, _ = chunked_scan(leaves["u"], delta, leaves["A"], leaves["B"], leaves["C"], h0)
        y = (y + leaves["u"] * leaves["D"][:, None]) * F.silu(leaves["z"])
    (y * weight).sum().backward()
    (selective_scan_ref(**ref_leaves, delta_softplus=True) * weight.double()).sum().backward()
    for name in x:
        assert rel_err(leaves[name].grad, ref_leaves[name].grad) < 1e-5, name


def flipped(x):
    """The inputs of make_inputs reversed in time (constant B/C, A, D and delta_bias have none)."""
    return {k: v.flip(-1) if v.dim() >= 3 and k != "initial_state" else v for k, v in x.items()}


@pytest.mark.parametrize("layout", ["variable", "grouped", "constant"])
def test_reverse_cpu_scan_is_the_flipped_scan_flipped_back(layout):
    x = make_inputs(2, 8, 37, 16, B=layout, C=layout)
    h0 = torch.randn(2, 8, 16)
    y, last = selective_scan(
        **x,
        delta_softplus=True,
        return_last_state=True,
        initial_state=h0,
        reverse=True,
        backend="cpu",
    )
    y_ref, last_ref = selective_scan_ref(
        **flipped(x), delta_softplus=True, return_last_state=True, initial_state=h0
    )
    assert rel_err(y, y_ref.flip(-1)) < 1e-5
    assert rel_err(last, last_ref) < 1e-5


@pytest.mark.parametrize("length", [45, 1])  # 1: a one-step stream, where no-gate was misread
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("drop", [None, "D", "z", "delta_bias"])
@pytest.mark.parametrize("softplus", [True, False])
def test_fused_cpu_scan_gradients_match_reference(reverse, drop, length, softplus):
    """Every gradient of the fused kernel (softplus, delta_bias, D, z, direction), float32,
    against autograd through the float64 reference, with and without each optional input."""
    x = {k: v for k, v in make_inputs(2, 8, length, 16).items() if k != drop}
    h0 = torch.randn(2, 8, 16)
    leaves = {k: v.clone().requires_grad_() for k, v in {**x, "initial_state": h0}.items()}
    ref = {k: v.double().clone().requires_grad_() for k, v in {**x, "initial_state": h0}.items()}
    w_y, w_last = torch.randn(2, 8, length), torch.randn(2, 8, 16)
    y, last = selective_scan(
        **leaves, delta_softplus=softplus, return_last_state=True, reverse=reverse, backend="cpu"
    )
    ((y * w_y).sum() + (last * w_last).sum()).backward()
    ref_in = flipped(ref) if reverse else ref
    y_ref, last_ref = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    y_ref = y_ref.flip(-1) if reverse else y_ref
    ((y_ref * w_y.double()).sum() + (last_ref * w_last.double()).sum()).backward()
    assert rel_err(y, y_ref) < 1e-5
    for name in leaves:
        assert rel_err(leaves[name].grad, ref[name].grad) < 1e-5, name


@pytest.mark.parametrize("layout", ["grouped", "constant"])
def test_reverse_cpu_scan_gradcheck(layout):
    x = make_inputs(2, 4, 6, 3, dtype=torch.float64, B=layout, C=layout)
    h0 = torch.randn(2, 4, 3, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = [x[n].clone().requires_grad_() for n in names] + [h0.clone().requires_grad_()]

    def fn(*args):
        return selective_scan(
            *args[:7],
            delta_bias=args[7],
            delta_softplus=True,
            return_last_state=True,
            initial_state=args[8],
            reverse=True,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("name", ["chunked", "reference"])
def test_reverse_on_other_backends_flips_around_the_forward_scan(name):
    x = make_inputs(2, 4, 21, 8)
    y = selective_scan(**x, delta_softplus=True, reverse=True, backend=name)
    expected = selective_scan(**flipped(x), delta_softplus=True, backend="cpu").flip(-1)
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_scan_reads_strided_inputs_as_given(reverse):
    """u, delta and z as the Mamba layer passes them (transposed and sliced views) give what
    their contiguous copies give, gradients included, in either direction: the outputs exactly,
    the gradients to float32 rounding (the strided kernels are compiled apart from the
    contiguous ones, and fastmath leaves the order of their sums to LLVM)."""
    x = make_inputs(2, 8, 30, 16)
    views = {k: x[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("u", "delta")}
    views["z"] = torch.cat([x["z"], x["z"]], dim=2)[..., :30]  # row stride 60
    assert not any(v.is_contiguous() for v in views.values())
    w = torch.randn(2, 8, 30, generator=torch.Generator().manual_seed(3))
    grads = []
    for inputs in ({k: x[k] for k in views}, views):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # strides kept
        y = selective_scan(**{**x, **leaves}, delta_softplus=True, reverse=reverse, backend="cpu")
        (y * w).sum().backward()
        grads.append((y.detach(), [leaves[k].grad for k in views]))
    (y0, g0), (y1, g1) = grads
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_reported_by_name():
    x = make_inputs(1, 4, 10, 16)
    x["B"] = x["B"][:, :8]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**x)


@pytest.mark.parametrize(
    "name,bad,error,message",
    [
        ("C", torch.randn(1, 3, 16, 10), ValueError, "C must have shape .* G dividing dim=4"),
        ("B", torch.randn(4, 8), ValueError, "B must have shape"),
        ("A", torch.randn(4, 16, 2), ValueError, "A must have shape"),
        ("initial_state", torch.randn(1, 4, 8), ValueError, "initial_state must have shape"),
        ("A", -torch.rand(4, 16, dtype=torch.complex64), TypeError, "complex A is not supported"),
        ("delta", torch.ones(1, 4, 10, dtype=torch.int64), TypeError, "delta must be float16"),
        ("D", torch.ones(4, device="meta"), ValueError, "D is on meta but u is on cpu"),
        ("z", [[0.0]], TypeError, "z must be a tensor"),
    ],
)
def test_bad_inputs_are_reported_by_name(name, bad, error, message):
    x = make_inputs(1, 4, 10, 16)
    x[name] = bad
    with pytest.raises(error, match=message):
        selective_scan(**x)


LAYOUTS = [
    ("variable", "variable"),
    ("grouped", "grouped"),
    ("constant", "constant"),
    ("grouped", "constant"),
    ("constant", "variable"),
]


def leaves_and_grads(scan, x, h0, weights):
    """Outputs, last state and the gradient of every input of one weighted loss."""
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    h0 = h0.clone().requires_grad_()
    y, last = scan(**leaves, delta_softplus=True, return_last_state=True, initial_state=h0)
    ((y.double() * weights[0]).sum() + (last.double() * weights[1]).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    return {"y": y, "last": last, **grads, "initial_state": h0.grad}


@pytest.mark.parametrize("name", ["cpu", "chunked"])
@pytest.mark.parametrize("layout_b,layout_c", LAYOUTS)
def test_every_layout_matches_reference_with_gradients(name, layout_b, layout_c):
    x = make_inputs(2, 4, 23, 5, B=layout_b, C=layout_c)
    h0 = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    weights = (
        torch.randn(2, 4, 23, dtype=torch.float64),
        torch.randn(2, 4, 5, dtype=torch.float64),
    )
    ref = leaves_and_grads(
        selective_scan_ref, {k: v.double() for k, v in x.items()}, h0.double(), weights
    )
    got = leaves_and_grads(lambda **kw: selective_scan(**kw, backend=name), x, h0, weights)
    for key, value in ref.items():
        assert got[key].shape == value.shape and got[key].dtype == torch.float32, key
        assert rel_err(got[key], value) < 1e-5, key


@pytest.mark.parametrize(
    "groups_b,groups_c,reverse,chunks",
    [
        (1, 1, False, 2.1),
        (2, 2, True, 2.1),
        (2, 5, False, 1),
        (4, 1, True, 2),
        ("constant", "constant", True, 2.1),
        ("constant", 5, False, 1),
        (1, "constant", True, 2),
    ],
)
def test_cpu_scan_blocks_of_lanes_match_reference_with_gradients(
    groups_b, groups_c, reverse, chunks
):
    """The CPU kernels scan LANES channels at a time, in blocks that never cross a group of B
    or C, over chunks of CHUNK steps: 40 channels in groups of 40, 20, 10 or 8 (full, part-idle
    and several blocks per batch element), 3 batch elements, a length of one or two chunks
    exactly or two and a bit, in both directions. A constant B or C (one per channel) is read
    per lane, alone or beside a grouped one."""
    from matten.ssm import cpu_kernel

    length = int(chunks * cpu_kernel.CHUNK)
    g = torch.Generator().manual_seed(1)
    x = make_inputs(3, 40, length, 16)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    for name, groups in (("B", groups_b), ("C", groups_c)):
        layout = "constant" if groups == "constant" else "grouped"
        x[name] = coefficients(layout, 3, 40, length, 16, r, groups)
    h0 = r(3, 40, 16)
    weights = (r(3, 40, length).double(), r(3, 40, 16).double())

    def reference(**kw):  # reverse: the forward scan of the flipped sequence, flipped back
        if not reverse:
            return selective_scan_ref(**kw)
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        flags = {k: v for k, v in kw.items() if k not in tensors}
        y, last = selective_scan_ref(**flipped(tensors), **flags)
        return y.flip(-1), last

    got = leaves_and_grads(
        lambda **kw: selective_scan(**kw, reverse=reverse, backend="cpu"), x, h0, weights
    )
    ref = leaves_and_grads(reference, {k: v.double() for k, v in x.items()}, h0.double(), weights)
    for key, value in ref.items():
        assert rel_err(got[key], value) < 1e-5, key


@pytest.mark.parametrize("layout", ["variable", "constant"])
def test_cpu_scan_gradients_do_not_depend_on_the_thread_count(layout):
    """Blocks are split across threads, each with its own buffers; the per-channel gradients
    come out the same bit for bit on one thread or two, those of B and C (summed over the
    threads' partials) to rounding. 3 x 20 channels: six blocks of 16 and 4, so that the second
    thread starts on a block with idle lanes."""
    x = make_inputs(3, 20, 45, 16, B=layout, C=layout)
    weight = torch.randn(3, 20, 45, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
            (selective_scan(**leaves, delta_softplus=True, backend="cpu") * weight).sum().backward()
            grads.append({k: v.grad for k, v in leaves.items()})
    finally:
        torch.set_num_threads(threads)
    for key in ("u", "delta", "z", "A", "D", "delta_bias"):
        assert torch.equal(grads[0][key], grads[1][key]), key
    for key in ("B", "C"):
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-6, atol=1e-5)


def test_cpu_scan_keeps_a_non_finite_B_to_its_own_batch_element():
    """An inf in one batch element's B makes that element's outputs and gradients non-finite,
    and no other's: its blocks' idle lanes (0 * inf) must not reach the next element's sums of
    the per-lane gradients of B and C, whichever thread the blocks ran on."""
    x = make_inputs(3, 20, 45, 16)
    x["B"] = x["B"].clone()
    x["B"][1, 3, 10] = float("inf")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the second thread starts on batch 1's block of 4 channels
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        y = selective_scan(**leaves, delta_softplus=True, backend="cpu")
        y[[0, 2]].sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert not torch.isfinite(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()
    for key in ("u", "delta", "z"):
        assert torch.isfinite(leaves[key].grad[[0, 2]]).all(), key
    assert torch.isfinite(leaves["B"].grad[[0, 2]]).all()
    assert torch.isfinite(leaves["C"].grad[[0, 2]]).all()


def test_reference_layouts_mean_what_mamba_ssm_says():
    """Grouped B/C: channel d uses group d // (dim // G); constant: one per channel, every step."""
    x = make_inputs(2, 6, 9, 3, B="grouped", C="constant", groups=3)
    y = selective_scan_ref(**x)
    for d in range(6):  # each channel alone, with B and C written out in the variable layout
        channel = dict(
            u=x["u"][:, d : d + 1],
            delta=x["delta"][:, d : d + 1],
            A=x["A"][d : d + 1],
            B=x["B"][:, d // 2],  # 6 channels in 3 groups: 2 per group
            C=x["C"][d][None, :, None].expand(2, 3, 9),  # the same C at every step
            D=x["D"][d : d + 1],
            z=x["z"][:, d : d + 1],
            delta_bias=x["delta_bias"][d : d + 1],
        )
        assert torch.allclose(selective_scan_ref(**channel), y[:, d : d + 1], atol=1e-6), d


def test_one_group_equals_the_variable_layout():
    x = make_inputs(2, 4, 15, 8)
    grouped = {**x, "B": x["B"][:, None], "C": x["C"][:, None]}
    for name in ["cpu", "chunked"]:
        assert torch.equal(
            selective_scan(**grouped, backend=name), selective_scan(**x, backend=name)
        )


def test_cpu_scan_gradcheck_constant_and_grouped_layouts():
    x = make_inputs(2, 4, 6, 3, dtype=torch.float64, B="constant", C="grouped")
    names = ["u", "delta", "A", "B", "C"]
    leaves = [x[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, delta_softplus=True, return_last_state=True), leaves
    )


# -- dispatch --------------------------------------------------------------------------------------


class FakeTriton:
    """Stands in for matten.ssm.triton_scan: runs where it is told to."""

    INTERPRETED = False

    def __init__(self, devices):
        self.devices = devices

    def runs_on(self, device):
        return device.type in self.devices


@pytest.fixture
def availability(monkeypatch):
    """Set which of mamba_ssm and triton "import", without a GPU or either package."""
    monkeypatch.delenv("MATTEN_SCAN_BACKEND", raising=False)

    def set_available(mamba_ssm=False, triton=None):
        monkeypatch.setattr(
            scan_module, "mamba_ssm_scan", lambda: (lambda *a: None) if mamba_ssm else None
        )
        monkeypatch.setattr(
            scan_module,
            "triton_scan_module",
            lambda: FakeTriton(triton) if triton is not None else None,
        )

    set_available()
    return set_available


def test_dispatch_order_on_cuda(availability):
    availability(mamba_ssm=True, triton=("cuda",))
    assert backend("cuda") == "mamba_ssm"
    assert backend("cuda", initial_state=True) == "triton"  # mamba_ssm's kernel takes none
    availability(mamba_ssm=False, triton=("cuda",))
    assert backend("cuda") == "triton"
    availability(mamba_ssm=False, triton=None)
    assert backend(torch.device("cuda:1")) == "chunked"
    availability(mamba_ssm=True, triton=None)
    assert backend("cuda", initial_state=True) == "chunked"


def test_dispatch_on_other_devices(availability):
    availability(mamba_ssm=True, triton=("cuda",))
    assert backend("cpu") == "cpu" and backend("meta") == "cpu"
    assert backend("mps") == "chunked"
    assert backend() == ("mamba_ssm" if torch.cuda.is_available() else "cpu")


def test_backend_override_by_environment_and_argument(availability, monkeypatch):
    availability(mamba_ssm=True, triton=("cuda",))
    monkeypatch.setenv("MATTEN_SCAN_BACKEND", "chunked")
    assert backend("cuda") == "chunked" and backend("cpu") == "chunked"
    assert backend("cuda", override="triton") == "triton"  # the argument wins
    monkeypatch.setenv("MATTEN_SCAN_BACKEND", " Reference ")
    assert backend("cpu") == "reference"
    monkeypatch.setenv("MATTEN_SCAN_BACKEND", "auto")
    assert backend("cuda") == "mamba_ssm"
    monkeypatch.setenv("MATTEN_SCAN_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast' .*MATTEN_SCAN_BACKEND"):
        backend("cpu")


@pytest.mark.parametrize(
    "override,device,kwargs,message",
    [
        ("mamba_ssm", "cpu", {}, "'mamba_ssm' runs CUDA tensors only"),
        ("mamba_ssm", "cuda", {"initial_state": True}, "'mamba_ssm' takes no initial_state"),
        ("cpu", "cuda", {}, "'cpu' runs CPU"),
        ("triton", "cpu", {}, "TRITON_INTERPRET=1"),
    ],
)
def test_unavailable_backend_is_refused_with_the_reason(
    availability, override, device, kwargs, message
):
    availability(mamba_ssm=True, triton=("cuda",))
    with pytest.raises(RuntimeError, match=message):
        backend(device, override=override, **kwargs)


@pytest.mark.parametrize("override", ["mamba_ssm", "triton"])
def test_missing_package_is_named(availability, override):
    with pytest.raises(RuntimeError, match=f"'{override}' is not available: {override} is not"):
        backend("cuda", override=override)


def test_selective_scan_follows_the_chosen_backend(availability, monkeypatch):
    x = make_inputs(2, 4, 19, 8, B="grouped")
    expected = selective_scan_ref(**x, delta_softplus=True).float()
    for name in ["cpu", "chunked", "reference"]:
        assert rel_err(selective_scan(**x, delta_softplus=True, backend=name), expected) < 1e-5
    # mamba_ssm is handed the caller's arguments unchanged, layouts included.
    calls = []
    monkeypatch.setattr(
        scan_module, "mamba_ssm_scan", lambda: lambda *args: calls.append(args) or "fused"
    )
    monkeypatch.setattr(scan_module, "_choose", lambda *a, **k: "mamba_ssm")
    assert selective_scan(**x, delta_softplus=True, return_last_state=True) == "fused"
    (args,) = calls
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    assert all(a is x[k] for a, k in zip(args[:8], names, strict=True)) and args[8:] == (True, True)


def mixer_by_hand(mixer, ssm, hidden):
    """One direction of a Mamba mixer written out with the reference scan."""
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    length = x.shape[-1]
    x = F.silu(ssm.conv1d(x)[..., :length])
    dt, B, C = ssm.x_proj(x.transpose(1, 2)).split([ssm.dt_rank, ssm.d_state, ssm.d_state], -1)
    delta = (dt @ ssm.dt_proj.weight.t()).transpose(1, 2)
    return selective_scan_ref(
        x,
        delta,
        -torch.exp(ssm.A_log),
        B.transpose(1, 2),
        C.transpose(1, 2),
        ssm.D,
        z,
        delta_bias=ssm.dt_proj.bias,
        delta_softplus=True,
    )


def test_mamba_block_matches_reference_and_is_causal():
    torch.manual_seed(0)
    mamba = Mamba(32)
    hidden = torch.randn(2, 21, 32)
    out = mamba(hidden)
    expected = mamba.out_proj(mixer_by_hand(mamba, mamba.ssms[0], hidden).transpose(1, 2))
    assert rel_err(out, expected) < 1e-5
    changed = hidden.clone()
    changed[:, 15] += 1.0
    diff = (mamba(changed) - out).abs().amax(dim=(0, 2))
    assert diff[:15].max() == 0 and diff[15:].min() > 0


def test_bimamba_is_forward_plus_flipped_backward_scan():
    torch.manual_seed(0)
    bi = BiMamba(16)
    hidden = torch.randn(2, 19, 16)
    y_fwd = mixer_by_hand(bi, bi.forward_ssm, hidden)
    y_bwd = mixer_by_hand(bi, bi.backward_ssm, hidden.flip(1)).flip(-1)
    expected = bi.out_proj(((y_fwd + y_bwd) / 2).transpose(1, 2))
    assert rel_err(bi(hidden), expected) < 1e-5
    # Both directions are live: a change in the middle reaches the first and the last token.
    changed = hidden.clone()
    changed[:, 9] += 1.0
    diff = (bi(changed) - bi(hidden)).abs().amax(dim=(0, 2))
    assert diff[0] > 0 and diff[-1] > 0


def test_bimamba_mean_folded_into_out_proj_is_bit_exact():
    """BiMamba's 1/2 goes into out_proj's weight instead of over the (batch, d_inner, L) sum of
    the directions: the output and every gradient are the same bit for bit as before."""
    torch.manual_seed(0)
    bi = BiMamba(16)
    hidden = torch.randn(2, 19, 16)
    weights = torch.randn(2, 19, 16)

    def run(folded):
        bi.zero_grad()
        h = hidden.clone().requires_grad_()
        if folded:
            out = bi(h)
        else:  # the mean over the activations, as before
            x, z = bi.project_in(h)
            mean = (bi.forward_ssm(x, z) + bi.backward_ssm(x, z, reverse=True)) * 0.5
            out = bi.project_out(mean)
        (out * weights).sum().backward()
        return [out, h.grad] + [p.grad.clone() for p in bi.parameters()]

    for a, b in zip(run(folded=True), run(folded=False), strict=True):
        assert torch.equal(a, b)


def test_bimamba_shares_projections_only():
    bi = BiMamba(64)
    names = {n for n, _ in bi.named_parameters()}
    assert {"in_proj.weight", "out_proj.weight"} <= names
    for part in ["conv1d.weight", "x_proj.weight", "dt_proj.weight", "A_log", "D"]:
        assert f"ssms.0.{part}" in names and f"ssms.1.{part}" in names
    assert bi.dt_rank == 4 and bi.d_inner == 128
    assert bi.forward_ssm.x_proj.out_features == 4 + 2 * 16


def test_mamba_initialisation():
    ssm = Mamba(48).ssms[0]
    assert torch.allclose(-torch.exp(ssm.A_log), -torch.arange(1, 17.0).expand(96, 16))
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(ssm.D, torch.ones(96))


def test_mamba_trains_backward():
    torch.manual_seed(0)
    bi = BiMamba(16)
    bi(torch.randn(2, 10, 16)).pow(2).mean().backward()
    for name, p in bi.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def run_in_pieces(mamba, hidden, sizes, state=None):
    """Run ``hidden`` through ``mamba`` in pieces of ``sizes`` tokens, carrying the state."""
    outs = []
    for part in hidden.split(sizes, dim=1):
        y, state = mamba(part, state, return_state=True)
        outs.append(y)
    return torch.cat(outs, dim=1), state


# Pieces shorter than the conv's reach (d_conv - 1 = 3 tokens) make the carried conv inputs span
# several pieces.
@pytest.mark.parametrize("scan", ["cpu", "chunked"])
@pytest.mark.parametrize("sizes", [[1] * 13, [2] * 6 + [1], [4, 4, 4, 1], [1, 7, 2, 3], [13]])
def test_mamba_in_pieces_equals_one_run(scan, sizes, monkeypatch):
    monkeypatch.setenv("MATTEN_SCAN_BACKEND", scan)
    torch.manual_seed(0)
    mamba = Mamba(8, d_state=4)
    hidden = torch.randn(2, 13, 8)
    with torch.no_grad():
        whole, whole_state = mamba(hidden, return_state=True)
        pieces, state = run_in_pieces(mamba, hidden, sizes)
        # a fresh state is the same as no state
        from_init, _ = run_in_pieces(mamba, hidden, sizes, mamba.init_state(2))
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_init, pieces, atol=1e-6, rtol=1e-5)
    assert isinstance(state, MambaState)
    assert state.conv.shape == (2, 16, 3) and state.ssm.shape == (2, 16, 4)
    torch.testing.assert_close(state.conv, whole_state.conv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.ssm, whole_state.ssm, atol=1e-6, rtol=1e-5)
    # the carried conv inputs are the last three inputs to the conv, i.e. in_proj's x
    torch.testing.assert_close(state.conv, mamba.project_in(hidden)[0][..., -3:])


def test_selective_ssm_in_pieces_equals_one_run():
    torch.manual_seed(0)
    mamba = Mamba(8, d_state=4)
    ssm = mamba.ssms[0]
    x, z = torch.randn(2, 2, 16, 9).unbind(0)
    with torch.no_grad():
        whole, whole_state = ssm(x, z, return_state=True)
        y1, state = ssm(x[..., :2], z[..., :2], return_state=True)
        y2, state = ssm(x[..., 2:], z[..., 2:], state, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.ssm, whole_state.ssm, atol=1e-6, rtol=1e-5)
    assert torch.equal(state.conv, x[..., -3:])


def test_mamba_streaming_path_matches_the_clip_path():
    """With and without return_state Mamba makes different conv calls; the outputs agree."""
    torch.manual_seed(0)
    mamba = Mamba(8, d_state=4)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        streamed, _ = mamba(x, return_state=True)
        torch.testing.assert_close(streamed, mamba(x), atol=1e-6, rtol=1e-5)


def test_mamba_state_must_match_the_batch():
    mamba = Mamba(8, d_state=4)
    with pytest.raises(ValueError, match="state is for batch 3"):
        mamba(torch.randn(2, 5, 8), mamba.init_state(3))


def test_scan_orders_round_trip_and_group_the_right_tokens():
    grid = TokenGrid(frames=3, height=2, width=4)
    f, h, w = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(4), indexing="ij")
    ids = torch.stack([f, h, w], -1).float()[None].repeat(2, 1, 1, 1, 1)  # (b, F, h, w, 3)
    tokens = grid_to_global(ids)
    assert torch.equal(global_to_grid(tokens, grid), ids)
    # Spatial-first: the first h*w tokens are frame 0 in raster order.
    assert tokens[0, :8, 0].eq(0).all() and tokens[0, 1].tolist() == [0, 0, 1]
    spatial = global_to_spatial(tokens, grid)
    assert spatial.shape == (6, 8, 3) and spatial[:, :, 0].eq(spatial[:, :1, 0]).all()
    assert torch.equal(spatial_to_global(spatial, grid), tokens)
    temporal = global_to_temporal(tokens, grid)
    assert temporal.shape == (16, 3, 3)
    assert torch.equal(temporal[:, :, 0], torch.arange(3.0).expand(16, 3))
    assert temporal[:, :, 1:].eq(temporal[:, :1, 1:]).all()  # one position per sequence
    assert torch.equal(temporal_to_global(temporal, grid), tokens)
    with pytest.raises(ValueError, match="grid 3x2x4"):
        global_to_spatial(tokens[:, :-1], grid)


def compiled_elementwise(fn):
    """``fn`` (a function the kernels call) applied to every element of an array, in numba."""
    import numba
    import numpy as np

    @numba.njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = fn(x[i])
        return out

    return apply


def test_float32_decay_is_an_accurate_exp():
    import numpy as np

    from matten.ssm.cpu_kernel import decay

    apply = compiled_elementwise(decay)
    x = np.concatenate([-np.linspace(0, 80, 20001), np.linspace(0, 5, 101)]).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(apply(x) - exact) / exact) < 5e-7
    assert apply(np.array([-200.0], np.float32))[0] < 1e-37  # underflow stays ~0
    x64 = -np.linspace(0, 30, 1001)
    assert np.allclose(apply(x64), np.exp(x64), rtol=1e-14, atol=0)  # float64: libm exp


def test_float32_log1p_is_accurate_on_the_unit_interval():
    import numpy as np

    from matten.ssm.cpu_kernel import log1p_unit

    apply = compiled_elementwise(log1p_unit)
    x = np.concatenate([np.linspace(0, 1, 20001), np.geomspace(1e-30, 1e-3, 200)]).astype(
        np.float32
    )
    exact = np.log1p(x.astype(np.float64))
    rel = np.abs(apply(x) - exact) / np.maximum(exact, 1e-300)
    assert rel.max() < 3e-7  # relatively exact down to tiny x, where log(1 + x) would round
    x64 = np.linspace(0, 1, 1001)
    assert np.allclose(apply(x64), np.log1p(x64), rtol=1e-15, atol=0)  # float64: libm log1p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_activations_equal_the_float64_functions(dtype):
    """The kernels' own softplus, sigmoid, silu and silu' equal the float64 functions to float32
    rounding (2e-6, near silu's zero too), across softplus's threshold and silu's tails, with
    and without the derivatives (softplus exactly: torch's returns its input above 20, 2e-9 off
    in float64), with a bias per lane. Below exp(-87) the float32 exp's clamp leaves a floor of
    1.6e-38 (times |z| for silu), hence the absolute tolerance."""
    import numpy as np

    from matten.ssm.cpu_kernel import _activate

    v = torch.cat([torch.linspace(-100, 100, 4001), torch.linspace(-1e-3, 1e-3, 101)]).to(dtype)
    v = v.reshape(-1, 2)  # (steps, lanes)
    z = v.flip(0).contiguous() * 1.3
    bias = torch.tensor([0.25, -0.5], dtype=dtype)
    dts, dsoftplus, gates, dgates = (np.full(v.shape, np.nan, v.numpy().dtype) for _ in "1234")
    args = (v.numpy(), bias.numpy(), True, z.numpy(), True)
    _activate(*args, True, dts, dsoftplus, gates, dgates)
    x = (v + bias).double()
    sig_z = torch.sigmoid(z.double())
    tol = dict(rtol=2e-6, atol=1e-35) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    for got, want in [
        (dts, x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))),
        (dsoftplus, torch.sigmoid(x)),
        (gates, F.silu(z.double())),
        (dgates, sig_z * (1 + z.double() * (1 - sig_z))),
    ]:
        torch.testing.assert_close(torch.from_numpy(got).double(), want, **tol)
    # without the derivatives: the same values
    dts2, gates2, unused = np.empty_like(dts), np.empty_like(dts), np.empty((0, 2), dts.dtype)
    _activate(*args, False, dts2, unused, gates2, unused)
    assert np.array_equal(dts2, dts) and np.allclose(gates2, gates, rtol=1e-6, atol=0)
    no_softplus = np.empty_like(dts)
    _activate(args[0], args[1], False, args[3], False, False, no_softplus, unused, gates, unused)
    assert np.array_equal(no_softplus, (v + bias).numpy())


def test_lane_loops_compile_with_noalias_arrays_and_wide_vectors():
    """The pipeline the kernels' loops over lanes compile with: array arguments marked noalias
    and functions asking for 512-bit vectors (LLVM's default on AVX-512 CPUs is 256). Were
    numba's pipeline to change so that the lowering pass is no longer swapped, this fails."""
    import re

    import llvmlite.binding as llvm
    import numba
    import numpy as np

    from matten.ssm import cpu_kernel

    def add(a, b, out):
        for k in range(a.shape[0]):
            out[k] = a[k] + b[k]

    lanes = numba.jit(**{**cpu_kernel._LANE_JIT, "cache": False})(add)
    plain = numba.njit(add)
    x = np.arange(16, dtype=np.float32)
    for f in (lanes, plain):
        out = np.empty_like(x)
        f(x, x, out)
        assert np.array_equal(out, 2 * x)
    ir, plain_ir = (next(iter(f.inspect_llvm().values())) for f in (lanes, plain))
    assert '"prefer-vector-width"="512"' in ir and '"min-legal-vector-width"="512"' in ir
    assert '"prefer-vector-width"="512"' not in plain_ir
    assert re.search(r"noalias[^,]*%arg\.out\.4", ir)  # the output's data pointer
    assert not re.search(r"noalias[^,]*%arg\.out\.4", plain_ir)
    if "+avx512f" in llvm.get_host_cpu_features().flatten():
        assert "zmm" in next(iter(lanes.inspect_asm().values()))


def test_scan_runs_on_meta_device_and_is_counted_as_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = {k: v.to("meta") for k, v in make_inputs(2, 8, 50, 16).items()}
    with FlopCounterMode(display=False) as counter:
        y = selective_scan(**x)
    assert y.shape == (2, 8, 50) and y.is_meta
    assert counter.get_total_flops() >= 2 * 3 * 2 * 8 * 50 * 16


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-ops"])
@pytest.mark.parametrize(
    "padding, crop",
    [
        ((3, 3), (0, None)),
        ((0, 0), (0, None)),
        ((3, 0), (0, None)),
        ((3, 3), (0, 11)),
        ((3, 3), (3, None)),
        ((2, 1), (1, -2)),
    ],
)
def test_depthwise_conv_equals_torch_conv_and_its_gradients(padding, crop, compiled, monkeypatch):
    """The Mamba conv's hand-written backward (compiled on CPU, torch ops elsewhere) gives
    torch's conv1d gradients, cropped outputs included; the forward is torch's own call, bit for
    bit."""
    from matten.ssm import depthwise_conv

    if not compiled:
        monkeypatch.setattr(depthwise_conv, "_has_no_negative_strides", lambda t: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, dtype=torch.float64, generator=g)
    w = torch.randn(6, 1, 4, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    ours, theirs = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    # a strided input, as the Mamba layer's in_proj output is
    y = depthwise_conv1d(
        ours[0].transpose(1, 2).contiguous().transpose(1, 2), *ours[1:], padding=padding, crop=crop
    )
    expected = F.conv1d(F.pad(theirs[0], padding), theirs[1], theirs[2], groups=6)
    expected = expected[..., slice(*crop)]
    assert torch.equal(y, expected)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(grad)
    expected.backward(grad)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="weight must have shape"):
        depthwise_conv1d(x, w[:4])


@pytest.mark.parametrize("length", [1, 37, 70])
@pytest.mark.parametrize(
    "padding, crop", [((3, 3), (0, -3)), ((3, 3), (3, None)), ((1, 5), (0, None))]
)
def test_depthwise_conv_compiled_backward_in_float32(length, padding, crop):
    """The compiled backward's vectorised loops (whole vectors and their remainders, rows
    shorter than the kernel) against torch's conv1d gradients in float32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, length, generator=g)
    w = torch.randn(5, 1, 4, generator=g)
    b = torch.randn(5, generator=g)
    ours, theirs = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    y = depthwise_conv1d(*ours, padding=padding, crop=crop)
    expected = F.conv1d(F.pad(theirs[0], padding), theirs[1], theirs[2], groups=5)
    expected = expected[..., slice(*crop)]
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    expected.backward(grad)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_channels_first_linear_equals_nn_linear_on_strided_input(with_bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=with_bias).double()
    tokens = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    channels_first = tokens.transpose(1, 2)  # a strided view, as the Mamba layer passes it
    out = channels_first_linear(linear.weight, linear.bias, channels_first)
    expected = linear(tokens).transpose(1, 2)
    assert out.shape == (3, 5, 7) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [tokens, linear.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [tokens, linear.weight])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_scan_gradients_at_the_softplus_threshold_and_saturated_gates(dtype):
    """delta + delta_bias past softplus's threshold of 20 (where it is the identity, gradient 1),
    far below it (gradient ~0), and gates far in silu's tails: the kernel's own sigmoid must
    agree with autograd through the float64 reference there too."""
    x = make_inputs(1, 6, 9, 4, dtype=dtype)
    # one level per channel, varied a little along time; 19.9 and 20.1 stay on their side of 20
    levels = torch.tensor([-30.0, -5.0, 0.0, 19.9, 20.1, 40.0], dtype=dtype)[:, None]
    x["delta"] = (levels + 0.05 * torch.linspace(-1, 1, 9, dtype=dtype)).expand(1, 6, 9)
    x["z"] = torch.tensor([-120.0, -30.0, -1.0, 0.5, 30.0, 120.0], dtype=dtype)[:, None].expand(
        1, 6, 9
    ) + torch.randn(1, 6, 9, dtype=dtype)
    x["delta_bias"] = torch.zeros(6, dtype=dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref = {k: v.double().clone().requires_grad_() for k, v in x.items()}
    w = torch.randn(1, 6, 9, dtype=torch.float64)
    (selective_scan(**leaves, delta_softplus=True, backend="cpu") * w.to(dtype)).sum().backward()
    (selective_scan_ref(**ref, delta_softplus=True) * w).sum().backward()
    for name in leaves:
        scale = ref[name].grad.abs().max().clamp_min(1e-12)
        assert (leaves[name].grad.double() - ref[name].grad).abs().max() / scale < 1e-4, name


def test_channels_first_linear_keeps_autocast_dtype_like_nn_linear():
    """A float32 bias added after a bfloat16 product would promote the output to float32."""
    linear = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channels_first_linear(linear.weight, linear.bias, x)
        expected = linear(x.transpose(1, 2)).transpose(1, 2)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)  # bfloat16 rounding
