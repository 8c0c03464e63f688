"""RMBG-2.0's model card snippet, line for line, with our network in place of `trust_remote_code`.

    python bench/model_card.py WEIGHTS OUT_DIR IMAGE...

Used by bench/bench.py as the baseline ("what users run today"): float32, per image,
torchvision/PIL transforms, `set_float32_matmul_precision('high')`.
"""
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rmbg_demo import load_model  # noqa: E402


def transform(size: int = 1024):
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def cut_out(model, path, out_dir, device, size: int = 1024) -> Image.Image:
    """The card's lines for one image: writes OUT_DIR/<stem>.png, returns the mask."""
    image = Image.open(path)
    input_images = transform(size)(image.convert("RGB")).unsqueeze(0).to(device)
    with torch.no_grad():
        preds = model(input_images)[-1].sigmoid().cpu()
    pred = preds[0].squeeze()
    pred_pil = transforms.ToPILImage()(pred)
    mask = pred_pil.resize(image.size)
    image.putalpha(mask)
    image.save(Path(out_dir) / f"{Path(path).stem}.png")
    return mask


def main(weights, out_dir, images):
    model = load_model("rmbg-2.0", weights)  # the card: AutoModelForImageSegmentation.from_pretrained(...)
    torch.set_float32_matmul_precision(["high", "highest"][0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    for path in images:
        cut_out(model, path, out_dir, device)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
