"""plots.py: the training-log picture reads damaged logs and puts each series where its values say."""
import json

from PIL import Image

from plots import PALETTE, line_chart, plot_training_log, read_log


def test_a_straight_line_is_drawn_through_the_right_pixels(tmp_path):
    # One series from (0, 0) to (10, 10) on linear axes: the point (2.5, 2.5) must be a quarter of the way along x
    # and 3/11 of the way up (the y range is padded by 0.5 each side).
    path = tmp_path / 'chart.png'
    line_chart({'y = x': ([0, 10], [0, 10])}, path, size=(400, 300))
    img = Image.open(path).convert('RGB')
    # the plotting area of draw_chart: x from 48 to 392, y from 16 to 282, the y range padded by 5% each side
    px0, py0, px1, py1 = 48, 16, 392, 282
    cx = px0 + 0.25 * (px1 - px0)
    cy = py1 - (2.5 + 0.5) / 11 * (py1 - py0)
    colours = {img.getpixel((int(cx) + dx, int(cy) + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert PALETTE[0] in colours, colours
    assert PALETTE[0] not in {img.getpixel((int(cx), int(py0 + 20 + d))) for d in range(3)}   # not elsewhere


def test_training_log_picture_survives_a_torn_last_line(tmp_path):
    log = tmp_path / 'log.jsonl'
    rows = [{'step': s, 'loss': 1 / s, 'lr': 1e-3, 'loss_by_sigma': {'0.1': 0.5 / s}} for s in (10, 20, 30)]
    rows.append({'step': 30, 'val_loss': 0.05, 'eval': {'KD_lenet': 0.01}})
    log.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 40, "lo')     # killed mid-write
    assert len(read_log(log)) == 4
    out = plot_training_log(str(log))
    assert out.endswith('log.png') and Image.open(out).size == (960, 600)
    assert not (tmp_path / 'log.png.tmp.png').exists()
