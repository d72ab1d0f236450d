"""Flow matching between class latents and images: paths, the loss, and ODE sampling.

For an image x_image of class y, x_class = embed(y) (a noisy class latent, see embeddings.py).

    mode l2i:  z0 = x_class, z1 = x_image                  (class -> image, C2I)
    mode i2l:  z0 = x_image, z1 = x_class                  (image -> class, I2C)
    mode bidi: the l2i pair, with z0 <-> z1 swapped per sample with probability lambda_b, and
               direction = 0 (class -> image) or 1 (image -> class) given to the model.

Straight (rectified-flow) path and its velocity, for t ~ U(0, 1) or logit-normal
t = sigmoid(ln_loc + ln_scale * n), n ~ N(0, 1):

    z_t = (1 - t) z0 + t z1,                v = dz_t/dt = z1 - z0
    with --si-scale s > 0 (stochastic interpolant, eps' ~ N(0, I)):
    z_t += t (1 - t) s eps',                v += (1 - 2t) s eps'

    loss = E || v_theta(z_t, t, cond, direction) - v ||^2      (mean over pixels, in float32)

Image -> class samples (all of i2l, direction 1 of bidi) flip t to 1 - t, so that the same draw gives the
same mixture (1 - t) x_class + t x_image in either direction, now with t measured from the image; then
(--i2c-time-power p) they take t <- t^p, density p(t) = t^(1/p - 1) / p for uniform t. Why: for t > 0
the class latent t m_c is visible in z_t, so the network can read the class off z_t; only near t = 0,
where sampling starts, must it read the class off the image. p = 3 puts half of that direction's
training below t = 1/8, the tiny preset's p = 50 puts 91% below t = 0.01. At t = 0 the ideal
I2C velocity is E[x_class | x_image] - x_image, so one Euler step x_image + v(x_image, 0) is the
posterior mean of the class means: the "t = 0 read-out" (READOUT). With --i2c-noise-scale r those samples
end at m_c + r std_scale eps, while class -> image ones start at m_c + std_scale eps. The maths allows it: the
direction is an input, so the two are separate fields of one network, and nothing ties their latents' widths. A
wide source gives class -> image room to draw varied images; a narrow target leaves image -> class less noise to
regress (at t = 0 its loss floor is r^2 std_scale^2 per pixel), and its read-out, E[m_c | x_image], does not change.

Guidance (CrossFlow-style indicator): cond = 0 (conditional) or 1 (null). With probability cfg_dropout a
pair is marked null and its class latent drawn for a random class, so the null branch learns to flow
from an unrelated class latent. At sampling time

    v = v_null + w (v_cond - v_null),       computed as one doubled batch; w = 1 is one pass.

With use_conditioning (a noise source, standard CFG) cond is the class id and K is the null id.

Sampling integrates dz/dt = v_theta(z, t) with torchdiffeq from t = 0 to 1 in a trained direction, and
from t = 1 back to 0 in the reverse one of an l2i or i2l model.
"""
import torch
import torch.nn.functional as F
from torchdiffeq import odeint

MODES = ("l2i", "i2l", "bidi")
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
# The sampler of reference and tiny, midpoint 8 steps (16 NFE) on the "ends" grid: on a 1,000-step tiny model, FID 45.2
# at cfg 2 where euler and rk4 at 16 NFE score 50.8 and 54.8 and 16 midpoint steps no better (RESULTS.md, "The
# sampler"). A solver named alone takes its own defaults: euler 40 uniform steps (the reference), rk4 its best grid.
DEFAULT_SOLVER = "midpoint"
DEFAULT_STEPS = {"euler": 40, "midpoint": 8, "rk4": 4}
TIME_GRIDS = ("uniform", "end", "start", "ends")
DEFAULT_TIME_GRID = {"euler": "uniform", "midpoint": "ends", "rk4": "end"}
CLASS_TO_IMAGE, IMAGE_TO_CLASS = 0, 1
# The t = 0 read-out: one Euler step from the image end, x + v(x, 0) (x - v(x, 1) for l2i models).
READOUT = dict(solver="euler", steps=1, time_grid="uniform")


def fixed_time_grid(steps, kind="uniform"):
    """`steps` + 1 points from 0 to 1 in integration progress s (s = 0 where the solve starts):

        uniform  s_i = i/n                  end   s_i = 1 - (1 - i/n)^2   (small steps near the end point)
        start    s_i = (i/n)^2              ends  s_i = (1 - cos(pi i/n))/2 (small steps at both ends)
    """
    if kind not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {', '.join(TIME_GRIDS)}")
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    s = {"uniform": u, "end": 1 - (1 - u) ** 2, "start": u**2, "ends": (1 - torch.cos(torch.pi * u)) / 2}[kind]
    return s.float()


def network_passes(nfe, cfg_scale):
    """Network passes per sample: with guidance each function evaluation runs a doubled batch."""
    return nfe * (1 if cfg_scale == 1.0 else 2)


class Flow:
    def __init__(self, mode="l2i", lambda_b=0.5, cfg_dropout=0.1, ln=False, ln_loc=0.0, ln_scale=1.0,
                 si_scale=0.0, use_conditioning=False, num_classes=10, i2c_time_power=1.0, i2c_noise_scale=1.0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0 <= lambda_b <= 1:
            raise ValueError(f"--lambda-b must lie in [0, 1], got {lambda_b}")
        if not 0 <= cfg_dropout < 1:
            raise ValueError(f"--cfg-dropout must lie in [0, 1), got {cfg_dropout}")
        if i2c_time_power <= 0:
            raise ValueError(f"--i2c-time-power must be positive, got {i2c_time_power}")
        if not i2c_noise_scale >= 0:  # NaN too
            raise ValueError(f"--i2c-noise-scale must be >= 0, got {i2c_noise_scale}")
        self.mode, self.lambda_b, self.cfg_dropout = mode, lambda_b, cfg_dropout
        self.ln, self.ln_loc, self.ln_scale, self.si_scale = ln, ln_loc, ln_scale, si_scale
        self.use_conditioning, self.num_classes, self.i2c_time_power = use_conditioning, num_classes, i2c_time_power
        self.i2c_noise_scale = i2c_noise_scale

    # ---------------------------------------------------------------- training
    def draw(self, x_image, y, embedder, generator=None):
        """All the randomness of one training step: the pair (z0, z1), cond, direction, t, eps'."""
        n, device = x_image.shape[0], x_image.device
        null = torch.rand(n, device=device, generator=generator) < self.cfg_dropout
        if self.use_conditioning:  # standard CFG: the null label K replaces the class
            cond, y_latent = torch.where(null, self.num_classes, y), y
        else:  # the indicator: null pairs get the latent of a random class
            cond = null.long()
            y_latent = torch.where(null, torch.randint(self.num_classes, (n,), device=device, generator=generator), y)
        x_class = embedder(y_latent, generator)
        if self.mode == "bidi":
            direction = (torch.rand(n, device=device, generator=generator) < self.lambda_b).long()
        else:
            direction = torch.full((n,), IMAGE_TO_CLASS if self.mode == "i2l" else CLASS_TO_IMAGE, device=device)
        to_class = (direction == IMAGE_TO_CLASS).view(-1, 1, 1, 1)
        if self.i2c_noise_scale != 1:  # image->class targets: their class latent's noise times r (module docstring)
            mean = embedder.means[y_latent]
            x_class = torch.where(to_class, mean + self.i2c_noise_scale * (x_class - mean), x_class)
        z0, z1 = torch.where(to_class, x_image, x_class), torch.where(to_class, x_class, x_image)

        if self.ln:  # logit-normal
            t = torch.sigmoid(self.ln_loc + self.ln_scale * torch.randn(n, device=device, generator=generator))
        else:
            t = torch.rand(n, device=device, generator=generator)
        # Image -> class samples (all of i2l, direction 1 of bidi) flip t, then take the power: both modes
        # draw the same times for that direction, measured from the image (t = 0 is the image).
        t = torch.where(direction == IMAGE_TO_CLASS, (1 - t) ** self.i2c_time_power, t)
        eps = torch.randn(z0.shape, device=device, generator=generator) if self.si_scale > 0 else None
        return dict(z0=z0, z1=z1, cond=cond, direction=direction, t=t, eps=eps)

    def regress(self, model, batch):
        """Per-sample float32 MSE between v_theta(z_t, t) and the path velocity."""
        z0, z1, t = batch["z0"], batch["z1"], batch["t"]
        t4 = t.view(-1, 1, 1, 1)
        z_t = (1 - t4) * z0 + t4 * z1
        v = z1 - z0
        if batch["eps"] is not None:
            z_t = z_t + t4 * (1 - t4) * self.si_scale * batch["eps"]
            v = v + (1 - 2 * t4) * self.si_scale * batch["eps"]
        direction = batch["direction"] if self.mode == "bidi" else None
        v_pred = model(z_t, t, batch["cond"], direction)
        # float32 even under bf16 autocast: late in training the velocity errors are below bf16's resolution.
        return F.mse_loss(v_pred.float(), v.float(), reduction="none").mean(dim=(1, 2, 3))

    def loss(self, model, x_image, y, embedder, generator=None):
        batch = self.draw(x_image, y, embedder, generator)
        per_sample = self.regress(model, batch)
        return per_sample.mean(), per_sample, batch

    # ---------------------------------------------------------------- sampling
    def integrate(self, model, z, direction, cond_class=None, cfg_scale=1.0, solver=DEFAULT_SOLVER, steps=None,
                  reverse=False, times=None, time_grid=None):
        """Integrate dz/dt = v_theta from t=0 to 1 (or 1 to 0 with reverse). Returns (z_end, nfe).

        `direction` goes to a bidi model, `cond_class` (class ids) to standard CFG. With `times` (increasing,
        in [0, 1]) the states at those times come back instead, (len(times), N, C, H, W). Fixed-step solvers
        take `steps` steps placed by `time_grid` (default: the solver's); dopri5 chooses its own.
        """
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        n = z.shape[0]
        if self.use_conditioning:
            assert cond_class is not None, "standard CFG samples need the class ids"
            cond, null = cond_class, torch.full_like(cond_class, self.num_classes)
        else:
            cond = torch.zeros(n, dtype=torch.long, device=z.device)
            null = torch.ones_like(cond)
        dirs = torch.full((n,), direction, dtype=torch.long, device=z.device) if self.mode == "bidi" else None
        guided = cfg_scale != 1.0
        if guided:  # one doubled batch: conditional half first, null half second
            cond = torch.cat([cond, null])
            dirs = torch.cat([dirs, dirs]) if dirs is not None else None
        nfe = 0

        def velocity(t, z_t):
            nonlocal nfe
            nfe += 1
            zz = torch.cat([z_t, z_t]) if guided else z_t
            v = model(zz, t.expand(zz.shape[0]).to(z_t.dtype), cond, dirs).float()
            if guided:
                v_cond, v_null = v.chunk(2)
                v = v_null + cfg_scale * (v_cond - v_null)
            return v

        grid = torch.as_tensor([0.0, 1.0] if times is None else times, dtype=torch.float32, device=z.device)
        if reverse:
            grid = grid.flip(0)
        if solver == "dopri5":
            # The network is called only inside [0, 1], where it was trained: steps end on the requested times
            # (step_t) instead of stepping past the end and interpolating back, and a fixed first step replaces
            # torchdiffeq's probe of the field at a guessed t0 + h0, which can lie outside.
            kw = dict(atol=1e-5, rtol=1e-5, options=dict(step_t=grid, first_step=0.01))
        else:
            # An exact grid (torchdiffeq's step_size can add a sliver step from rounding: a wrong NFE).
            progress = fixed_time_grid(steps or DEFAULT_STEPS[solver], time_grid or DEFAULT_TIME_GRID[solver])
            kw = dict(options=dict(grid_constructor=lambda func, y0, t: t[0] + (t[-1] - t[0]) * progress.to(t)))
        states = odeint(velocity, z.float(), grid, method=solver, **kw)
        return (states[-1] if times is None else states), nfe

    @torch.no_grad()
    def c2i(self, model, embedder, y, generator=None, z=None, **kw):
        """Class -> image: start at a class latent of y (or a given z), end at an image."""
        if z is None:
            z = embedder(y, generator)
        return self.integrate(model, z, CLASS_TO_IMAGE, cond_class=y, reverse=self.mode == "i2l", **kw)

    @torch.no_grad()
    def i2c(self, model, embedder, x_image, **kw):
        """Image -> class latent; decode with embedder.decode."""
        if self.use_conditioning:
            raise ValueError("a noise-source model has no image -> class direction")
        return self.integrate(model, x_image, IMAGE_TO_CLASS, reverse=self.mode == "l2i", **kw)
