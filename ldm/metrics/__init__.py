"""Metrics: per-image quality (`image`: PSNR, SSIM, LPIPS distance), distribution distances (`fid`: FID, KID
on Inception features) and text alignment (`clip`: CLIP score). `fid` and `clip` load their networks on
first use, so importing this package stays cheap."""
from ldm.metrics.image import lpips_distance, lpips_metric_name, psnr, ssim

__all__ = ["lpips_distance", "lpips_metric_name", "psnr", "ssim"]
