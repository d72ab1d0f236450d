"""Tests for the velocity models (model_dit.DiT, model_unet.UNet): shapes, zero init, conditioning
wiring, gradients, bf16 autocast, torch.compile and a small overfit. Tiny sizes, CPU, seconds."""
import pytest
import torch

from model_dit import DIT_PRESETS, DiT
from model_unet import UNET_PRESETS, UNet

# Tiny tensors on a shared 2-core CPU: a second OpenMP thread only spins against other processes
# (measured 10-30x slower per step under load), so the model tests run single-threaded.
torch.set_num_threads(1)

NUM_CLASSES = 3


def tiny_dit(input_size=32, in_channels=1, bidirectional=False):
    return DiT(input_size, in_channels, patch_size=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=NUM_CLASSES, bidirectional=bidirectional)


def tiny_unet(input_size=32, in_channels=1, bidirectional=False):
    return UNet(input_size, in_channels, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(16,), dropout=0.0, num_heads=2, num_classes=NUM_CLASSES,
                bidirectional=bidirectional)


BUILDERS = {'dit': tiny_dit, 'unet': tiny_unet}


def make_inputs(batch=4, in_channels=1, input_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, input_size, input_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    cond = torch.arange(batch) % NUM_CLASSES
    direction = torch.arange(batch) % 2
    return x, t, cond, direction


def perturbed(model, scale=0.05, seed=0):
    """Move every weight off its (partly zero) init so all paths carry signal, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize('kind', BUILDERS)
@pytest.mark.parametrize('in_channels', [1, 3])
@pytest.mark.parametrize('input_size', [32, 64])
def test_output_shape_equals_input_shape(kind, in_channels, input_size):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](input_size, in_channels))
    x, t, cond, _ = make_inputs(2, in_channels, input_size)
    assert model(x, t, cond).shape == x.shape


@pytest.mark.parametrize('kind', BUILDERS)
def test_output_is_exactly_zero_at_init(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind](bidirectional=True)
    x, t, cond, direction = make_inputs()
    assert torch.equal(model(x, t, cond, direction), torch.zeros_like(x))


@pytest.mark.parametrize('kind', BUILDERS)
def test_time_cond_and_direction_each_change_the_output(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    base = model(x, t, cond, direction)
    changed = {
        't': model(x, (t + 0.3) % 1.0, cond, direction),
        'cond': model(x, t, (cond + 1) % NUM_CLASSES, direction),
        'direction': model(x, t, cond, 1 - direction),
    }
    for name, out in changed.items():
        per_sample = (out - base).flatten(1).abs().amax(dim=1)
        assert (per_sample > 1e-4).all(), f'changing {name} left some outputs unchanged: {per_sample}'


@pytest.mark.parametrize('kind', BUILDERS)
def test_direction_required_iff_bidirectional(kind):
    x, t, cond, direction = make_inputs()
    with pytest.raises(AssertionError, match='direction'):
        BUILDERS[kind](bidirectional=True)(x, t, cond)
    with pytest.raises(AssertionError, match='direction'):
        BUILDERS[kind](bidirectional=False)(x, t, cond, direction)


@pytest.mark.parametrize('kind', BUILDERS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs(batch=6)  # every class id and both directions appear
    model(x, t, cond, direction).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f'no gradient reaches {dead}'


@pytest.mark.parametrize('kind', BUILDERS)
def test_zero_init_model_learns_from_plain_sgd_steps(kind):
    # From the exact zero init only the last layers get gradient; a few steps must open every path.
    torch.manual_seed(0)
    model = BUILDERS[kind](bidirectional=True)
    x, t, cond, direction = make_inputs(batch=6)
    target = torch.randn_like(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x, t, cond, direction) - target).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    (model(x, t, cond, direction) - target).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not dead, f'no gradient reaches {dead}'


@pytest.mark.parametrize('kind', BUILDERS)
def test_bf16_autocast_is_close_to_fp32(kind):
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    reference = model(x, t, cond, direction)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low_precision = model(x, t, cond, direction)
    relative_error = (low_precision.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05, relative_error


def test_unet_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = perturbed(tiny_unet(bidirectional=True))
    x, t, cond, direction = make_inputs()
    reference = model(x, t, cond, direction)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t, cond, direction)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kind', BUILDERS)
def test_models_trace_as_one_graph(kind):
    # fullgraph=True raises on any graph break; the eager backend skips code generation (seconds).
    torch._dynamo.reset()
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    torch.testing.assert_close(compiled(x, t, cond, direction), model(x, t, cond, direction))


@pytest.mark.parametrize('kind', BUILDERS)
def test_inductor_matches_eager_compile(kind):
    # The real compiler: cold ~25 s (DiT) and ~80 s (UNet) on the shared 2-core CPU, ~15 s each
    # once inductor's on-disk cache is warm.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = perturbed(BUILDERS[kind](bidirectional=True))
    x, t, cond, direction = make_inputs()
    reference = model(x, t, cond, direction)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, t, cond, direction), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', BUILDERS)
def test_overfits_a_fixed_random_velocity(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    x, t, cond, _ = make_inputs(batch=4)
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):  # stops at the first 10x drop (measured: ~60 steps DiT, ~30 UNet)
        loss = (model(x, t, cond) - target).square().mean()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] / 10, f'MSE only fell from {losses[0]:.3f} to {min(losses):.3f} in 200 steps'


@pytest.mark.parametrize('input_size, in_channels', [(32, 1), (64, 3)])
def test_every_preset_builds_and_keeps_the_shape(input_size, in_channels):
    # On the meta device: checks the wiring of the full-size presets without allocating them.
    x, t, cond, direction = (tensor.to('meta') for tensor in make_inputs(2, in_channels, input_size))
    assert set(DIT_PRESETS) == set(UNET_PRESETS) == {'tiny', 'mnist', 'cifar', 'imagenet'}
    with torch.device('meta'):
        for name in DIT_PRESETS:
            dit = DiT(input_size, in_channels, **DIT_PRESETS[name], bidirectional=True)
            unet = UNet(input_size, in_channels, **UNET_PRESETS[name], bidirectional=True)
            assert dit(x, t, cond, direction).shape == x.shape, name
            assert unet(x, t, cond, direction).shape == x.shape, name
