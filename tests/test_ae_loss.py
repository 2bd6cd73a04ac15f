import copy

import pytest
import torch

from ldm.losses.autoencoder import AutoencoderLoss, hinge_discriminator_loss
from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.tasks.autoencoding import AutoencoderTask

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32)


def _setup(disc_start=0, lpips_net="alex", **loss_kwargs):  # alex: the cheapest LPIPS backbone
    torch.manual_seed(0)
    ae = AutoencoderKL(embed_dim=3, z_channels=3, **TINY)
    loss = AutoencoderLoss(disc_start=disc_start, disc_ndf=8, disc_num_layers=2, lpips_net=lpips_net,
                           lpips_pretrained=False, **loss_kwargs).train()  # offline: no backbone file
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return ae, loss, x


def _grad(value, param):
    return torch.autograd.grad(value, param, retain_graph=True)[0]


def test_lpips_gradient_reaches_the_decoder():
    ae, loss, x = _setup(disc_start=10**9, lpips_net="vgg", pixel_weight=0.0, perceptual_weight=1.0)
    rec, posterior = ae(x, sample=False)
    total, logs = loss(x, rec, posterior, step=0, last_layer=ae.last_layer())
    assert logs["lpips_random"] > 0 and "lpips" not in logs  # a random backbone is never named lpips
    # nll is LPIPS alone here (plus a KL term of weight 1e-6 that never reaches the decoder's last layer)
    assert _grad(total, ae.last_layer()).abs().sum() > 0
    assert all(not p.requires_grad for p in loss.lpips.parameters()) and not loss.lpips.training


def test_adversarial_term_and_adaptive_weight():
    ae, loss, x = _setup(disc_start=0)
    rec, posterior = ae(x, sample=False)
    last = ae.last_layer()
    total_on, logs = loss(x, rec, posterior, step=5, last_layer=last)
    loss.disc_start = 10**9
    total_off, _ = loss(x, rec, posterior, step=5, last_layer=last)
    grad_off = _grad(total_off, last)
    adversarial = _grad(total_on, last) - grad_off  # float32 cancellation: compare at grad_off's scale
    # independent reference: lambda * disc_weight * grad of -D(x_rec) on the last layer, lambda from Eq. 7
    disc = copy.deepcopy(loss.discriminator)
    g_ref = -disc(rec).mean()
    nll_ref = ((x - rec).abs() + loss.lpips(x, rec)).sum() / 2  # logvar = 0
    lam = _grad(nll_ref, last).norm() / (_grad(g_ref, last).norm() + 1e-4)
    assert logs["d_weight"].item() == pytest.approx(0.5 * lam.item(), rel=1e-4)
    expected = 0.5 * lam * _grad(g_ref, last)
    torch.testing.assert_close(adversarial, expected, rtol=1e-3, atol=1e-5 * grad_off.abs().max().item())
    assert expected.abs().max() > 1e-3 * grad_off.abs().max()  # the term is not negligible


def test_one_backward_gives_each_optimizer_exactly_its_own_gradient():
    ae, loss, x = _setup(disc_start=0)
    task = AutoencoderTask(ae, loss).train()
    disc_ref = copy.deepcopy(loss.discriminator)
    torch.manual_seed(1)
    total, logs = task({"image": x}, step=3)
    total.backward()
    # reference 1: a separate discriminator-only loss on detached reconstructions
    torch.manual_seed(1)
    rec_ref, _ = ae(x)  # same posterior sample (same seed)
    d_ref = hinge_discriminator_loss(disc_ref(x), disc_ref(rec_ref.detach()))
    d_ref.backward()
    assert logs["d"].item() == pytest.approx(d_ref.item(), rel=1e-5)
    for (name, p), p_ref in zip(loss.discriminator.named_parameters(), disc_ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in loss.discriminator.parameters())
    # reference 2: the discriminator term adds nothing to the autoencoder's gradient
    enc_grad = ae.encoder.conv_in.weight.grad.clone()
    ae.zero_grad()
    torch.manual_seed(1)
    total_again, _ = task({"image": x}, step=3)
    (total_again - logs["d"]).backward()  # drop the d-term's value: gradient identical if it was isolated
    torch.testing.assert_close(ae.encoder.conv_in.weight.grad, enc_grad)


def test_before_disc_start_discriminator_gets_zero_gradient():
    ae, loss, x = _setup(disc_start=100)
    task = AutoencoderTask(ae, loss).train()
    total, logs = task({"image": x}, step=99)
    total.backward()
    assert logs["d_weight"] == 0 and logs["disc_factor"] == 0
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in loss.discriminator.parameters())


def test_logvar_is_optimised():
    ae, loss, x = _setup(disc_start=10**9)
    task = AutoencoderTask(ae, loss).train()
    groups = task.param_groups()
    assert any(p is loss.logvar for p in groups["autoencoder"])
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in loss.discriminator.parameters()}
    optimizers = [torch.optim.AdamW(params, lr=1e-2) for params in groups.values()]
    before = loss.logvar.item()
    total, _ = task({"image": x}, step=0)
    total.backward()
    for opt in optimizers:
        opt.step()
    assert loss.logvar.item() != before


def test_vq_task_logs_and_evaluate():
    torch.manual_seed(0)
    ae = VQModel(n_embed=32, embed_dim=3, z_channels=3, **TINY)
    loss = AutoencoderLoss(disc_start=0, disc_ndf=8, disc_num_layers=2, lpips_net="alex", lpips_pretrained=False)
    task = AutoencoderTask(ae, loss).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    total, logs = task({"image": x}, step=0)
    assert total.dim() == 0 and {"codebook", "codebook_usage", "perplexity", "g", "d"} <= set(logs)
    task.eval()
    metrics = task.evaluate({"image": x})
    assert set(metrics) == {"psnr", "ssim", "lpips_random", "codebook_usage", "perplexity"}
    assert all(isinstance(v, float) for v in metrics.values())
    vis = task.visualize({"image": x})
    pairs = vis["reconstructions"]
    assert pairs.images.shape == (4, *x.shape[1:]) and pairs.images.abs().max() <= 1
    assert torch.equal(pairs.images[0::2], x) and pairs.group == 2  # each input, then its reconstruction
    assert pairs.captions[0] == "input" and pairs.captions[1].startswith("reconstruction ")


def test_latent_statistics_sets_scale_factor():
    ae, loss, _ = _setup()
    task = AutoencoderTask(ae, loss).eval()
    batches = [{"image": torch.rand(2, 3, 32, 32) * 2 - 1} for _ in range(3)]
    torch.manual_seed(7)
    stats = task.latent_statistics(batches)
    torch.manual_seed(7)
    z = torch.cat([ae.encode_latent(b["image"]) for b in batches]).double()
    assert ae.scale_factor.item() == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-5)
    torch.testing.assert_close(ae.latent_std.double(), z.transpose(0, 1).flatten(1).std(1, unbiased=False),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["latent_mean"].double(), z.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # An autoencoder trained on the posterior mean is measured on the mean: stage 2 will encode that.
    AutoencoderTask(ae, loss, sample_posterior=False).latent_statistics(batches)
    mean = torch.cat([ae.encode_latent(b["image"], sample=False) for b in batches]).double()
    assert ae.scale_factor.item() == pytest.approx(1 / mean.std(unbiased=False).item(), rel=1e-5)
    assert mean.std() < z.std()  # so the two measurements differ by the posterior noise


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_pixel_loss_matches_its_closed_form(pixel_loss):
    ae, loss, x = _setup(disc_start=10**9, perceptual_weight=0.0, pixel_loss=pixel_loss)
    rec, posterior = ae(x, sample=False)
    _, logs = loss(x, rec, posterior, step=0, last_layer=ae.last_layer())
    error = (x - rec).double()
    per_pixel = error.abs() if pixel_loss == "l1" else error.square()
    expected = per_pixel.sum() / x.shape[0]  # logvar starts at 0: nll = sum over pixels, mean over batch
    torch.testing.assert_close(logs["nll"].double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="pixel_loss"):
        AutoencoderLoss(disc_start=0, perceptual_weight=0.0, pixel_loss="huber")


def test_sample_posterior_false_decodes_the_mean():
    ae, loss, x = _setup(disc_start=10**9, perceptual_weight=0.0)
    deterministic = AutoencoderTask(ae, loss, sample_posterior=False).train()
    first, _ = deterministic({"image": x}, step=0)
    second, _ = deterministic({"image": x}, step=0)
    assert torch.equal(first, second)  # no posterior noise
    sampled = AutoencoderTask(ae, loss).train()
    assert not torch.equal(sampled({"image": x}, step=0)[0], first)
