"""Make the small real media files the media tests send through WAHA: a voice note, a JPEG, a WebP sticker, a PDF.

Run `python fakes/make_media.py` after `apt-get install espeak-ng opus-tools webp imagemagick`; it writes
fakes/data/media/* and SHA256SUMS. The tools are pinned by what Debian 12 ships; `--serial` (opus) and
`-strip` (JPEG) keep the files byte-for-byte reproducible with those versions. `--check` only verifies the
committed files against SHA256SUMS (what the tests do, without the tools).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

MEDIA_DIR = Path(__file__).resolve().parent / "data" / "media"
SUMS = MEDIA_DIR / "SHA256SUMS"
VOICE_TEXT = "qual o horário de vocês?"  # what the voice note says (the fake LLM's transcript of it)
# A longer one (about 13 s, ~40 KB) for the benchmark's 200 voice notes (bench/media_bench.py).
LONG_VOICE_TEXT = ("Oi, bom dia! Eu queria saber qual é o horário de funcionamento de vocês no sábado, e também se "
                   "vocês fazem entrega em Campinas, porque eu preciso receber o pedido até sexta-feira. Obrigada!")
OPUS_SERIAL = "1717"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _pdf(text: str) -> bytes:
    """A one-page PDF written by hand: no producer stamp or creation date, so it is the same every time."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def make() -> None:
    MEDIA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "voice.wav"
        _run("espeak-ng", "-v", "pt-br", "-s", "150", "-w", str(wav), VOICE_TEXT)
        _run("opusenc", "--quiet", "--serial", OPUS_SERIAL, "--bitrate", "24", "--discard-comments",
             str(wav), str(MEDIA_DIR / "voice_note.ogg"))
        long_wav = Path(tmp) / "long.wav"
        _run("espeak-ng", "-v", "pt-br", "-s", "150", "-w", str(long_wav), LONG_VOICE_TEXT)
        _run("opusenc", "--quiet", "--serial", OPUS_SERIAL, "--bitrate", "24", "--discard-comments",
             str(long_wav), str(MEDIA_DIR / "voice_note_long.ogg"))
        png = Path(tmp) / "sticker.png"
        _run("convert", "-size", "160x120", "gradient:#d33-#36c", "-fill", "white", "-draw", "circle 80,60 80,20",
             "-strip", "-quality", "80", str(MEDIA_DIR / "product.jpg"))
        _run("convert", "-size", "128x128", "xc:none", "-fill", "#fc0", "-draw", "circle 64,64 64,8",
             "-fill", "black", "-draw", "circle 44,50 44,58", "-draw", "circle 84,50 84,58", "-strip", str(png))
        _run("cwebp", "-quiet", "-q", "75", "-metadata", "none", str(png), "-o", str(MEDIA_DIR / "sticker.webp"))
    (MEDIA_DIR / "boleto.pdf").write_bytes(_pdf("Boleto: R$ 123,45 - vencimento 10/12/2026"))
    SUMS.write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in sorted(_files())), encoding="utf-8")


def _files() -> list[Path]:
    return [p for p in MEDIA_DIR.iterdir() if p.name not in ("SHA256SUMS", "README.md")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check() -> list[str]:
    """Problems with the committed files: a missing file, a changed one, or one over 50 KB ([] = all good)."""
    problems = []
    for line in SUMS.read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        path = MEDIA_DIR / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif _sha256(path) != digest:
            problems.append(f"{name}: sha256 differs from SHA256SUMS")
        elif path.stat().st_size > 50_000:
            problems.append(f"{name}: {path.stat().st_size} bytes, over 50 KB")
    return problems


if __name__ == "__main__":
    if "--check" not in sys.argv:
        make()
    found = check()
    print("\n".join(found) or f"ok: {', '.join(sorted(p.name for p in _files()))}")
    sys.exit(1 if found else 0)
