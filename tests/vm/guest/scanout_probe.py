"""In the guest, as root: what the kernel scans out, read with the product's KMS module
(spice_stream_worker.sources.kms, from the installed .deb), saved as a PNG; one JSON report on
stdout: the CRTCs, the planes, the primary framebuffer's layout and what reading it costs.

Usage: scanout_probe.py OUTDIR TAG"""

from __future__ import annotations

import json
import statistics
import sys
import time

from PIL import Image

from spice_stream_common import kms

READS = 10


def main() -> int:
    outdir, tag = sys.argv[1], sys.argv[2]
    report: dict = {"tag": tag, "cards": kms.cards()}
    with kms.Card(report["cards"][0]) as card:
        crtcs = card.crtcs()
        planes = card.planes()
        report["crtcs"] = [c.__dict__ for c in crtcs]
        report["planes"] = [p.__dict__ for p in planes]
        active = [c for c in crtcs if c.fb_id and c.width]
        if not active:
            report["error"] = "no CRTC with a framebuffer"
            print(json.dumps(report))
            return 1
        crtc = active[0]
        fb = card.framebuffer(crtc.fb_id)
        report["fb"] = {**fb.__dict__, "format": fb.format_name}
        try:
            t0 = time.perf_counter()
            with card.map(fb, fb.handle) as m:
                report["map_ms"] = round((time.perf_counter() - t0) * 1000, 2)
                times = []
                for _ in range(READS):
                    t = time.perf_counter()
                    data = m[fb.offset:fb.offset + fb.pitch * fb.height]
                    times.append((time.perf_counter() - t) * 1000)
                report["read_ms"] = {"median": round(statistics.median(times), 2),
                                     "max": round(max(times), 2),
                                     "mb": round(len(data) / 1e6, 2)}
        finally:
            card.close_handle(fb.handle)
        # The visible part: the CRTC's mode, from its x/y in the framebuffer.
        img = Image.frombuffer("RGB", (fb.width, fb.height), data, "raw", "BGRX", fb.pitch, 1)
        img = img.crop((crtc.x, crtc.y, crtc.x + crtc.width, crtc.y + crtc.height))
        img.save(f"{outdir}/scanout-{tag}.png")
        cursor = [p for p in planes if p.kind == "cursor" and p.crtc_id == crtc.crtc_id and p.fb_id]
        if cursor:
            cfb = card.framebuffer(cursor[0].fb_id)
            report["cursor_fb"] = {**cfb.__dict__, "format": cfb.format_name}
            card.close_handle(cfb.handle)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
