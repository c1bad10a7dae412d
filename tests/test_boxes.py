import numpy as np

from gmner.core.boxes import iou_matrix


def test_iou_against_hand_computed_values():
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 10]]
    # overlaps: identical -> 1; half shifted -> 50 / 150; disjoint -> 0; contained half -> 50 / 100
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0, 0.5]])


def test_degenerate_and_empty_inputs():
    assert iou_matrix([[3, 3, 3, 3]], [[3, 3, 3, 3]]).tolist() == [[0.0]]
    assert iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)
