"""The shared contact sheet (run --sweep, [matrix], training samples)."""

from PIL import Image, ImageDraw

from krea2kit.output.sheets import LABEL_HEIGHT, contact_sheet


def test_columns_widen_to_fit_their_labels_and_blocked_cells_stay_grey():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    labels = ["detail = -1.00 (a long label)", "detail = +1.00"]
    sheet = contact_sheet([[red, None], [None, blue]], labels)
    width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(labels[0])) + 4
    assert width > 64 and sheet.size == (2 * width, LABEL_HEIGHT + 2 * 64)
    assert sheet.getpixel((1, LABEL_HEIGHT + 1)) == (255, 0, 0)
    assert sheet.getpixel((width + 1, LABEL_HEIGHT + 1)) == (128, 128, 128)
    assert sheet.getpixel((width + 1, LABEL_HEIGHT + 65)) == (0, 0, 255)


def test_row_labels_sit_in_a_left_margin():
    cell = Image.new("RGB", (32, 32), (0, 255, 0))
    plain = contact_sheet([[cell]], ["a"])
    labelled = contact_sheet([[cell]], ["a"], ["a prompt"])
    margin = labelled.width - plain.width
    assert margin > 0 and labelled.getpixel((margin + 1, LABEL_HEIGHT + 1)) == (0, 255, 0)
