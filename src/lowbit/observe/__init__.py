"""Streaming calibration observers and the range-selection methods that read them."""

from lowbit.observe.histogram import ChannelMinMax, Histogram
from lowbit.observe.ranges import METHODS, entropy, minmax, mse, percentile, select_range

__all__ = ["ChannelMinMax", "Histogram", "METHODS", "entropy", "minmax", "mse", "percentile", "select_range"]
