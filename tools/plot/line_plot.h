// Line charts rendered to PNG without any graphics or compression library,
// for evaluation reports: typically one panel per metric, plotting the metric
// against the KV budget with one line per eviction policy.
//
// Each panel gets an axes box with grid lines and numeric ticks, axis labels,
// a title and a legend below the axes. Text uses the built-in 5x7 font, so
// only printable ASCII renders as itself (anything else shows as '?').
#ifndef MORPHSERVE_TOOLS_PLOT_LINE_PLOT_H_
#define MORPHSERVE_TOOLS_PLOT_LINE_PLOT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace morphserve::plot {

// One line: points are joined in the order given. A NaN x or y leaves a gap
// (the neighbouring segments are not drawn).
struct Series {
  std::string name;
  std::vector<double> x, y;
};

struct LinePlot {
  std::string title, x_label, y_label;
  // Plots x on a log2 scale, for budgets like 64, 128, 256, 512; x must then
  // be positive. Ticks sit at the data's distinct x values when there are at
  // most six, else at powers of two (or at five of the values when the range
  // spans fewer than four powers of two).
  bool log2_x = false;
  // Fixes an end of the y axis. An end left unset follows the data: rounded
  // out to a tick, plus a small margin.
  std::optional<double> y_min, y_max;
  std::vector<Series> series;  // at most kMaxSeriesPerPanel
};

inline constexpr int kMaxSeriesPerPanel = 8;
// The smallest panel that still fits ticks, labels and a legend.
inline constexpr int kMinPanelWidth = 200;
inline constexpr int kMinPanelHeight = 150;
// Bounds memory use; 8192 pixels is far beyond any screen-sized report.
inline constexpr int kMaxImageSide = 8192;

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// Colour of the series at `index` (0 <= index < kMaxSeriesPerPanel) within its
// panel: eight colours that tell apart at a glance and read on white.
Rgb SeriesColor(int index);

// Draws `panels` row by row in a grid of `columns` columns, into one RGB PNG
// of width x height pixels written to `path`. Each panel gets an equal cell,
// which must be at least kMinPanelWidth x kMinPanelHeight, and must leave the
// axes at least 40x40 pixels after its labels and legend (long series names
// take legend rows). Invalid input gives InvalidArgument naming the offending
// panel or series; a file that cannot be written gives an error naming `path`.
absl::Status WritePlotGridPng(const std::vector<LinePlot>& panels, int columns, int width,
                              int height, const std::string& path);

// As WritePlotGridPng, but returns the encoded PNG instead of writing it.
absl::StatusOr<std::vector<uint8_t>> RenderPlotGridPng(const std::vector<LinePlot>& panels,
                                                       int columns, int width, int height);

}  // namespace morphserve::plot

#endif  // MORPHSERVE_TOOLS_PLOT_LINE_PLOT_H_
