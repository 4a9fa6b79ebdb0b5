#include "tools/plot/line_plot.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "tools/plot/font5x7.h"
#include "tools/plot/png_writer.h"

namespace morphserve::plot {
namespace {

// Tableau's first eight categorical colours: distinct in hue, and none of them
// close to the black of the axes or the grey of the grid.
constexpr std::array<Rgb, kMaxSeriesPerPanel> kPalette = {{{31, 119, 180},
                                                           {255, 127, 14},
                                                           {44, 160, 44},
                                                           {214, 39, 40},
                                                           {148, 103, 189},
                                                           {140, 86, 75},
                                                           {227, 119, 194},
                                                           {127, 127, 127}}};
constexpr Rgb kInk{0, 0, 0};  // axes, ticks and text
constexpr Rgb kGrid{228, 228, 228};

// Layout, in pixels.
constexpr int kMargin = 6;  // cell edge to anything drawn in it
constexpr int kTickLength = 4;
constexpr int kLabelGap = 3;  // tick mark to tick label
constexpr int kBlockGap = 5;  // between stacked blocks: ticks, axis label, legend
constexpr int kMarkerSize = 6;
constexpr int kSwatchLength = 14;  // the line sample in a legend entry
// A line of text, tails below the baseline included. Tick labels are numbers,
// which have no tails, so they take only kGlyphHeight.
constexpr int kTextHeight = kGlyphHeight + kGlyphDescent;
constexpr int kLegendRowHeight = kTextHeight + 2;
constexpr int kLegendEntryGap = 12;
// Below this the lines of a panel would be unreadable.
constexpr int kMinPlotSide = 40;
// Titles are drawn at twice the size when the cell is at least this tall.
constexpr int kLargeTitleMinHeight = 200;

// Half-open pixel rectangle [left, right) x [top, bottom).
struct Rect {
  int left = 0, top = 0, right = 0, bottom = 0;
  int width() const { return right - left; }
  int height() const { return bottom - top; }
};

int TextWidth(std::string_view text, int scale) {
  if (text.empty()) return 0;
  return (static_cast<int>(text.size()) * kGlyphAdvance - 1) * scale;
}

// Shortens `text` with a trailing ".." until it is at most max_width pixels
// wide, so that a long name stays inside its panel and still reads as cut.
std::string FitText(std::string_view text, int max_width, int scale) {
  if (TextWidth(text, scale) <= max_width) return std::string(text);
  const int chars = std::max(0, (max_width / scale + 1) / kGlyphAdvance);
  if (chars < 3) return std::string(text.substr(0, static_cast<size_t>(chars)));
  std::string fitted(text.substr(0, static_cast<size_t>(chars - 2)));
  fitted += "..";
  return fitted;
}

// Whether the pixel in column gx, row gy of the glyph for `ch` is set.
bool GlyphBit(char ch, int gx, int gy) {
  return ((Glyph(ch)[static_cast<size_t>(gy)] >> (kGlyphWidth - 1 - gx)) & 1) != 0;
}

// An RGB raster, initially white. Every drawing call is confined to the clip
// rectangle, so callers may pass coordinates that stick out.
class Canvas {
 public:
  Canvas(int width, int height)
      : width_(width),
        height_(height),
        clip_{0, 0, width, height},
        rgb_(static_cast<size_t>(width) * static_cast<size_t>(height) * 3, 255) {}

  std::span<const uint8_t> rgb() const { return rgb_; }

  // Confines drawing to `clip` (within the image) until the next call.
  void SetClip(const Rect& clip) {
    clip_ = {std::max(clip.left, 0), std::max(clip.top, 0), std::min(clip.right, width_),
             std::min(clip.bottom, height_)};
  }

  void Fill(const Rect& r, Rgb c) {
    for (int y = std::max(r.top, clip_.top); y < std::min(r.bottom, clip_.bottom); ++y) {
      for (int x = std::max(r.left, clip_.left); x < std::min(r.right, clip_.right); ++x) {
        uint8_t* p = &rgb_[3 * (static_cast<size_t>(y) * static_cast<size_t>(width_) +
                                static_cast<size_t>(x))];
        p[0] = c.r;
        p[1] = c.g;
        p[2] = c.b;
      }
    }
  }

  // Bresenham's line stamped with a 2x2 brush whose top-left pixel follows
  // the line, which makes it about two pixels thick at any slope.
  void ThickLine(int x0, int y0, int x1, int y1, Rgb c) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
    const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    while (true) {
      Fill({x0, y0, x0 + 2, y0 + 2}, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) {
        err += dy;
        x0 += sx;
      }
      if (e2 <= dx) {
        err += dx;
        y0 += sy;
      }
    }
  }

  // A square marker centred on the brush of ThickLine at (x, y).
  void Marker(int x, int y, Rgb c) {
    const int lo = kMarkerSize / 2 - 1;
    Fill({x - lo, y - lo, x - lo + kMarkerSize, y - lo + kMarkerSize}, c);
  }

  // Draws `text` with the top-left corner of its box at (x, y), each font
  // pixel as a scale x scale block.
  void Text(int x, int y, std::string_view text, int scale, Rgb c) {
    for (char ch : text) {
      const int top = y + GlyphDrop(ch) * scale;
      for (int gy = 0; gy < kGlyphHeight; ++gy) {
        for (int gx = 0; gx < kGlyphWidth; ++gx) {
          if (GlyphBit(ch, gx, gy)) {
            Fill({x + gx * scale, top + gy * scale, x + (gx + 1) * scale, top + (gy + 1) * scale},
                 c);
          }
        }
      }
      x += kGlyphAdvance * scale;
    }
  }

  // Draws `text` turned a quarter turn anticlockwise, reading upwards, with
  // the bottom-left corner of its box at (x, y).
  void VerticalText(int x, int y, std::string_view text, Rgb c) {
    for (char ch : text) {
      const int left = x + GlyphDrop(ch);
      for (int gy = 0; gy < kGlyphHeight; ++gy) {
        for (int gx = 0; gx < kGlyphWidth; ++gx) {
          if (GlyphBit(ch, gx, gy)) {
            Fill({left + gy, y - gx, left + gy + 1, y - gx + 1}, c);
          }
        }
      }
      y -= kGlyphAdvance;
    }
  }

 private:
  int width_, height_;
  Rect clip_;
  std::vector<uint8_t> rgb_;
};

// Whether point i of `s` is drawn; a non-finite coordinate makes a gap.
bool Drawable(const Series& s, size_t i) { return std::isfinite(s.x[i]) && std::isfinite(s.y[i]); }

// An axis: its range in axis units (log2 of the value on a log2 axis) and its
// ticks, in data values.
struct Axis {
  bool log2 = false;
  double lo = 0, hi = 1;
  std::vector<double> ticks;
  std::vector<std::string> labels;

  double Units(double v) const { return log2 ? std::log2(v) : v; }
  // Position of `v` along a run of `pixels` pixels, from 0 at lo to
  // pixels - 1 at hi.
  double Position(double v, int pixels) const {
    return (Units(v) - lo) / (hi - lo) * static_cast<double>(pixels - 1);
  }
};

// Labels ticks `step` apart (step = mantissa * 10^exponent) with just enough
// decimals to tell them apart.
std::string LinearTickLabel(double v, double mantissa, int exponent) {
  if (std::abs(v) >= 1e7 || exponent < -6) return absl::StrFormat("%.4g", v);
  const int decimals = std::max(0, -exponent) + (mantissa == 2.5 && exponent <= 0 ? 1 : 0);
  return absl::StrFormat("%.*f", decimals, v);
}

// A linear axis over [lo, hi] (lo < hi). Picks the step of 1, 2, 2.5 or 5
// times a power of ten that gives closest to five ticks, and rounds each end
// that is not fixed out to a multiple of it, so that the axis ends on ticks.
Axis LinearAxis(double lo, double hi, bool lo_fixed, bool hi_fixed) {
  // Slack for steps such as 0.1 that are inexact in binary.
  constexpr double kEps = 1e-9;
  // Clamped to the exponents of double so that a span of infinity or of a
  // few denormals still converts to int.
  const int top_exponent =
      static_cast<int>(std::clamp(std::floor(std::log10(hi - lo)), -330.0, 310.0));
  // Stays as given, without ticks, only if no step can index the ticks.
  Axis best;
  best.lo = lo;
  best.hi = hi;
  int64_t best_miss = std::numeric_limits<int64_t>::max();
  double best_mantissa = 1;
  int best_exponent = 0;
  int64_t best_first = 0, best_last = 0;
  double best_step = 1;
  for (int exponent = top_exponent - 2; exponent <= top_exponent + 1; ++exponent) {
    for (double mantissa : {1.0, 2.0, 2.5, 5.0}) {
      const double step = mantissa * std::pow(10.0, exponent);
      const double a = lo_fixed ? lo : std::floor(lo / step + kEps) * step;
      const double b = hi_fixed ? hi : std::ceil(hi / step - kEps) * step;
      const double first_index = std::ceil(a / step - kEps);
      const double last_index = std::floor(b / step + kEps);
      // Also rejects the NaN and infinity that extreme steps produce.
      if (!(std::abs(first_index) < 1e15 && std::abs(last_index) < 1e15)) continue;
      const auto first = static_cast<int64_t>(first_index);
      const auto last = static_cast<int64_t>(last_index);
      const int64_t miss = std::abs(last - first + 1 - 5);
      // Among equally good steps, the one that stretches the axis least.
      if (miss < best_miss || (miss == best_miss && b - a < best.hi - best.lo)) {
        best_miss = miss;
        best.lo = a;
        best.hi = b;
        best_mantissa = mantissa;
        best_exponent = exponent;
        best_first = first;
        best_last = last;
        best_step = step;
      }
    }
  }
  // Ticks are index * step rather than a running sum, so errors do not add up.
  for (int64_t i = best_first; i <= best_last; ++i) {
    const double v = static_cast<double>(i) * best_step;
    best.ticks.push_back(v);
    best.labels.push_back(LinearTickLabel(v, best_mantissa, best_exponent));
  }
  return best;
}

// An axis for data in [lo, hi] (empty when lo > hi) with optionally fixed
// ends. An end that is not fixed is rounded out to a tick and then given a
// margin of 4%, so that markers at the extremes stay clear of the axes box.
Axis PaddedLinearAxis(double lo, double hi, std::optional<double> fixed_lo,
                      std::optional<double> fixed_hi) {
  if (lo > hi) {  // no drawable point
    lo = 0;
    hi = 1;
  }
  if (lo == hi) {
    const double half = std::max(0.1 * std::abs(lo), 0.5);
    lo -= half;
    hi += half;
  }
  if (fixed_lo) lo = *fixed_lo;
  if (fixed_hi) hi = *fixed_hi;
  // The data lies entirely beyond a fixed end.
  if (!(hi > lo)) {
    if (fixed_hi) {
      lo = hi - 1;
    } else {
      hi = lo + 1;
    }
  }
  Axis axis = LinearAxis(lo, hi, fixed_lo.has_value(), fixed_hi.has_value());
  const double margin = 0.04 * (axis.hi - axis.lo);
  if (!fixed_lo) axis.lo -= margin;
  if (!fixed_hi) axis.hi += margin;
  return axis;
}

std::string LogTickLabel(double v) {
  if (v == std::round(v) && v < 1e7) return absl::StrFormat("%.0f", v);
  return absl::StrFormat("%.3g", v);
}

// A log2 axis over the positive values `xs`. Budgets are usually a handful of
// powers of two, so up to six distinct values are ticked as they are; more
// get ticks at powers of two, or at five of the values spread evenly when the
// range holds fewer than four powers of two.
Axis Log2Axis(std::vector<double> xs) {
  Axis axis;
  axis.log2 = true;
  std::sort(xs.begin(), xs.end());
  xs.erase(std::unique(xs.begin(), xs.end()), xs.end());
  if (xs.empty()) xs = {1, 2, 4, 8};
  if (xs.size() == 1) xs = {xs[0] / 2, xs[0], xs[0] * 2};
  const double lo = std::log2(xs.front()), hi = std::log2(xs.back());
  if (xs.size() <= 6) {
    axis.ticks = xs;
  } else {
    const int first_power = static_cast<int>(std::ceil(lo - 1e-9));
    const int last_power = static_cast<int>(std::floor(hi + 1e-9));
    const int num_powers = last_power - first_power + 1;
    if (num_powers >= 4) {
      const int stride = (num_powers + 5) / 6;
      for (int p = first_power; p <= last_power; ++p) {
        // Multiples of the stride, so that 1 (2^0) is ticked when in range.
        if (p % stride == 0) axis.ticks.push_back(std::exp2(p));
      }
    } else {
      for (size_t i = 0; i < 5; ++i) axis.ticks.push_back(xs[i * (xs.size() - 1) / 4]);
    }
  }
  for (double v : axis.ticks) axis.labels.push_back(LogTickLabel(v));
  const double margin = 0.04 * (hi - lo);
  axis.lo = lo - margin;
  axis.hi = hi + margin;
  return axis;
}

Axis XAxis(const LinePlot& plot) {
  std::vector<double> xs;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const Series& s : plot.series) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!Drawable(s, i)) continue;
      xs.push_back(s.x[i]);
      lo = std::min(lo, s.x[i]);
      hi = std::max(hi, s.x[i]);
    }
  }
  if (plot.log2_x) return Log2Axis(std::move(xs));
  return PaddedLinearAxis(lo, hi, std::nullopt, std::nullopt);
}

Axis YAxis(const LinePlot& plot) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const Series& s : plot.series) {
    for (size_t i = 0; i < s.y.size(); ++i) {
      if (!Drawable(s, i)) continue;
      lo = std::min(lo, s.y[i]);
      hi = std::max(hi, s.y[i]);
    }
  }
  return PaddedLinearAxis(lo, hi, plot.y_min, plot.y_max);
}

// Label every stride-th tick, where the stride keeps labels `extent` pixels
// long from touching when consecutive ticks lie `positions` apart.
size_t LabelStride(const std::vector<double>& positions, int extent) {
  double min_gap = std::numeric_limits<double>::infinity();
  for (size_t i = 1; i < positions.size(); ++i) {
    min_gap = std::min(min_gap, std::abs(positions[i] - positions[i - 1]));
  }
  if (!(min_gap > 0) || std::isinf(min_gap)) return 1;
  return static_cast<size_t>(std::max(1.0, std::ceil((extent + 4) / min_gap)));
}

struct Segment {
  double x0, y0, x1, y1;
};

// Liang-Barsky: the part of `s` inside [xmin, xmax] x [ymin, ymax], if any.
// Clipping before rounding to pixels keeps far-off points from overflowing.
std::optional<Segment> ClipSegment(const Segment& s, double xmin, double ymin, double xmax,
                                   double ymax) {
  const double dx = s.x1 - s.x0, dy = s.y1 - s.y0;
  const double p[4] = {-dx, dx, -dy, dy};
  const double q[4] = {s.x0 - xmin, xmax - s.x0, s.y0 - ymin, ymax - s.y0};
  double t0 = 0, t1 = 1;
  for (int i = 0; i < 4; ++i) {
    if (p[i] == 0) {
      if (q[i] < 0) return std::nullopt;  // parallel to this edge and outside
      continue;
    }
    const double t = q[i] / p[i];
    if (p[i] < 0) {
      t0 = std::max(t0, t);
    } else {
      t1 = std::min(t1, t);
    }
    if (t0 > t1) return std::nullopt;
  }
  return Segment{s.x0 + t0 * dx, s.y0 + t0 * dy, s.x0 + t1 * dx, s.y0 + t1 * dy};
}

// Rounds to the nearest pixel; coordinates far off the canvas are clamped so
// that they stay within int.
int Round(double v) { return static_cast<int>(std::lround(std::clamp(v, -1e9, 1e9))); }

struct LegendEntry {
  std::string text;
  Rgb color;
  int x = 0;  // from the left of the legend area
  int row = 0;
};

int LegendEntryWidth(const std::string& text) {
  return kSwatchLength + kLabelGap + TextWidth(text, 1);
}

// Flows one entry per series into rows no wider than `width`, each row
// centred; a name too long for a row of its own is shortened.
std::vector<LegendEntry> LayoutLegend(const std::vector<Series>& series, int width, int* num_rows) {
  std::vector<LegendEntry> entries;
  std::vector<int> row_widths;
  int x = 0;
  for (size_t i = 0; i < series.size(); ++i) {
    LegendEntry e;
    e.text = FitText(series[i].name, width - kSwatchLength - kLabelGap, 1);
    e.color = SeriesColor(static_cast<int>(i));
    const int w = LegendEntryWidth(e.text);
    if (row_widths.empty() || x + w > width) {
      row_widths.push_back(0);
      x = 0;
    }
    e.x = x;
    e.row = static_cast<int>(row_widths.size()) - 1;
    row_widths.back() = x + w;
    x += w + kLegendEntryGap;
    entries.push_back(std::move(e));
  }
  for (LegendEntry& e : entries) e.x += (width - row_widths[static_cast<size_t>(e.row)]) / 2;
  *num_rows = static_cast<int>(row_widths.size());
  return entries;
}

std::string PanelName(const LinePlot& plot, size_t index) {
  return absl::StrFormat("panel %d (\"%s\")", index, plot.title);
}

absl::Status ValidatePanel(const LinePlot& plot, size_t index) {
  if (plot.series.size() > kMaxSeriesPerPanel) {
    return absl::InvalidArgumentError(absl::StrFormat("%s has %d series; at most %d are allowed",
                                                      PanelName(plot, index), plot.series.size(),
                                                      kMaxSeriesPerPanel));
  }
  for (const Series& s : plot.series) {
    if (s.x.size() != s.y.size()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s, series \"%s\": %d x values but %d y values", PanelName(plot, index),
                          s.name, s.x.size(), s.y.size()));
    }
    if (!plot.log2_x) continue;
    for (double x : s.x) {
      if (x <= 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s, series \"%s\": x = %g cannot be shown on a log2 axis",
                            PanelName(plot, index), s.name, x));
      }
    }
  }
  if ((plot.y_min && !std::isfinite(*plot.y_min)) || (plot.y_max && !std::isfinite(*plot.y_max)) ||
      (plot.y_min && plot.y_max && !(*plot.y_min < *plot.y_max))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: y_min and y_max must be finite with y_min < y_max, got [%g, %g]",
        PanelName(plot, index), plot.y_min.value_or(-HUGE_VAL), plot.y_max.value_or(HUGE_VAL)));
  }
  return absl::OkStatus();
}

// Draws one panel into `cell` of the canvas.
absl::Status DrawPanel(const LinePlot& plot, size_t index, const Rect& cell, Canvas* canvas) {
  const Axis x_axis = XAxis(plot);
  const Axis y_axis = YAxis(plot);
  const Rect inner{cell.left + kMargin, cell.top + kMargin, cell.right - kMargin,
                   cell.bottom - kMargin};

  const int title_scale =
      TextWidth(plot.title, 2) <= inner.width() && cell.height() >= kLargeTitleMinHeight ? 2 : 1;
  const std::string title = FitText(plot.title, inner.width(), title_scale);
  const std::string x_label = FitText(plot.x_label, inner.width(), 1);
  int legend_rows = 0;
  const std::vector<LegendEntry> legend = LayoutLegend(plot.series, inner.width(), &legend_rows);
  int y_labels_width = 0;
  for (const std::string& label : y_axis.labels) {
    y_labels_width = std::max(y_labels_width, TextWidth(label, 1));
  }
  int x_labels_width = 0;
  for (const std::string& label : x_axis.labels) {
    x_labels_width = std::max(x_labels_width, TextWidth(label, 1));
  }

  // Stack the blocks around the plot area: title above; tick labels, axis
  // label and legend below; axis label and tick labels on the left. The top
  // and right leave room for the half of a tick label that sticks out past
  // the last tick.
  Rect area = inner;
  if (!title.empty()) area.top += kTextHeight * title_scale + kBlockGap;
  area.top += kGlyphHeight / 2 + 1;
  const int legend_top = inner.bottom - legend_rows * kLegendRowHeight;
  area.bottom = legend_top;
  if (legend_rows > 0) area.bottom -= kBlockGap;
  const int x_label_top = area.bottom - kTextHeight;
  if (!x_label.empty()) area.bottom = x_label_top - kBlockGap;
  area.bottom -= kGlyphHeight + kLabelGap + kTickLength;
  if (!plot.y_label.empty()) area.left += kTextHeight + kBlockGap;
  area.left += y_labels_width + kLabelGap + kTickLength;
  area.right -= x_labels_width / 2;
  if (area.width() < kMinPlotSide || area.height() < kMinPlotSide) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: a %dx%d panel leaves a %dx%d plot area after its labels and legend of %d series; "
        "at least %dx%d is needed, so make the image larger or the names shorter",
        PanelName(plot, index), cell.width(), cell.height(), std::max(area.width(), 0),
        std::max(area.height(), 0), plot.series.size(), kMinPlotSide, kMinPlotSide));
  }
  const auto pixel_x = [&](double v) { return area.left + x_axis.Position(v, area.width()); };
  // Only y can lie far outside the box (x always spans the data). It is
  // clamped so that the clipper keeps enough precision for the part of a
  // segment inside the box, which moving a far end beyond 1e12 pixels shifts
  // by well under a pixel.
  const auto pixel_y = [&](double v) {
    return std::clamp(area.bottom - 1 - y_axis.Position(v, area.height()), -1e12, 1e12);
  };

  canvas->SetClip(cell);
  // Grid lines under everything else.
  std::vector<double> x_ticks, y_ticks;
  for (double v : x_axis.ticks) x_ticks.push_back(pixel_x(v));
  for (double v : y_axis.ticks) y_ticks.push_back(pixel_y(v));
  for (double px : x_ticks) canvas->Fill({Round(px), area.top, Round(px) + 1, area.bottom}, kGrid);
  for (double py : y_ticks) canvas->Fill({area.left, Round(py), area.right, Round(py) + 1}, kGrid);
  canvas->Fill({area.left, area.top, area.right, area.top + 1}, kInk);
  canvas->Fill({area.left, area.bottom - 1, area.right, area.bottom}, kInk);
  canvas->Fill({area.left, area.top, area.left + 1, area.bottom}, kInk);
  canvas->Fill({area.right - 1, area.top, area.right, area.bottom}, kInk);

  const size_t x_stride = LabelStride(x_ticks, x_labels_width);
  for (size_t i = 0; i < x_ticks.size(); ++i) {
    const int px = Round(x_ticks[i]);
    canvas->Fill({px, area.bottom, px + 1, area.bottom + kTickLength}, kInk);
    if (i % x_stride != 0) continue;
    const std::string& label = x_axis.labels[i];
    canvas->Text(px - TextWidth(label, 1) / 2, area.bottom + kTickLength + kLabelGap, label, 1,
                 kInk);
  }
  const size_t y_stride = LabelStride(y_ticks, kGlyphHeight);
  for (size_t i = 0; i < y_ticks.size(); ++i) {
    const int py = Round(y_ticks[i]);
    canvas->Fill({area.left - kTickLength, py, area.left, py + 1}, kInk);
    if (i % y_stride != 0) continue;
    const std::string& label = y_axis.labels[i];
    canvas->Text(area.left - kTickLength - kLabelGap - TextWidth(label, 1), py - kGlyphHeight / 2,
                 label, 1, kInk);
  }

  const int center_x = (area.left + area.right) / 2;
  canvas->Text((inner.left + inner.right - TextWidth(title, title_scale)) / 2, inner.top, title,
               title_scale, kInk);
  canvas->Text(center_x - TextWidth(x_label, 1) / 2, x_label_top, x_label, 1, kInk);
  const std::string y_label = FitText(plot.y_label, area.height(), 1);
  canvas->VerticalText(inner.left, (area.top + area.bottom + TextWidth(y_label, 1)) / 2, y_label,
                       kInk);

  // Series. Segments are clipped to the axes box exactly; the canvas clip is
  // a little wider so that markers on the box edge stay whole.
  canvas->SetClip({area.left - kMarkerSize, area.top - kMarkerSize, area.right + kMarkerSize,
                   area.bottom + kMarkerSize});
  const double xmax = area.right - 1, ymax = area.bottom - 1;
  for (size_t k = 0; k < plot.series.size(); ++k) {
    const Series& s = plot.series[k];
    const Rgb color = SeriesColor(static_cast<int>(k));
    for (size_t i = 1; i < s.x.size(); ++i) {
      if (!Drawable(s, i - 1) || !Drawable(s, i)) continue;
      const Segment seg{pixel_x(s.x[i - 1]), pixel_y(s.y[i - 1]), pixel_x(s.x[i]), pixel_y(s.y[i])};
      // Data far beyond a fixed y range can map past the range of double.
      if (!std::isfinite(seg.x0 + seg.y0 + seg.x1 + seg.y1)) continue;
      const std::optional<Segment> clipped = ClipSegment(seg, area.left, area.top, xmax, ymax);
      if (!clipped) continue;
      canvas->ThickLine(Round(clipped->x0), Round(clipped->y0), Round(clipped->x1),
                        Round(clipped->y1), color);
    }
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!Drawable(s, i)) continue;
      const double px = pixel_x(s.x[i]), py = pixel_y(s.y[i]);
      if (!(px >= area.left && px <= xmax && py >= area.top && py <= ymax)) continue;
      canvas->Marker(Round(px), Round(py), color);
    }
  }

  canvas->SetClip(cell);
  for (const LegendEntry& e : legend) {
    const int x = inner.left + e.x, y = legend_top + e.row * kLegendRowHeight;
    // The 2-pixel line and the marker centre on the middle of the text.
    const int line_y = y + kGlyphHeight / 2 - 1;
    canvas->ThickLine(x, line_y, x + kSwatchLength - 2, line_y, e.color);
    canvas->Marker(x + kSwatchLength / 2 - 1, line_y, e.color);
    canvas->Text(x + kSwatchLength + kLabelGap, y, e.text, 1, kInk);
  }
  return absl::OkStatus();
}

}  // namespace

Rgb SeriesColor(int index) { return kPalette[static_cast<size_t>(index)]; }

absl::StatusOr<std::vector<uint8_t>> RenderPlotGridPng(const std::vector<LinePlot>& panels,
                                                       int columns, int width, int height) {
  if (panels.empty()) return absl::InvalidArgumentError("no panels to draw");
  if (columns < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("columns must be at least 1, got %d", columns));
  }
  if (width > kMaxImageSide || height > kMaxImageSide) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "image of %dx%d exceeds the limit of %d pixels a side", width, height, kMaxImageSide));
  }
  const int num_panels = static_cast<int>(panels.size());
  const int rows = (num_panels - 1) / columns + 1;
  const int cell_width = width / columns, cell_height = height / rows;
  if (cell_width < kMinPanelWidth || cell_height < kMinPanelHeight) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a %dx%d image split into %d columns and %d rows gives %dx%d panels; each panel needs "
        "at least %dx%d pixels",
        width, height, columns, rows, cell_width, cell_height, kMinPanelWidth, kMinPanelHeight));
  }
  for (size_t i = 0; i < panels.size(); ++i) RETURN_IF_ERROR(ValidatePanel(panels[i], i));

  Canvas canvas(width, height);
  for (size_t i = 0; i < panels.size(); ++i) {
    const int row = static_cast<int>(i) / columns, column = static_cast<int>(i) % columns;
    const Rect cell{column * cell_width, row * cell_height, (column + 1) * cell_width,
                    (row + 1) * cell_height};
    RETURN_IF_ERROR(DrawPanel(panels[i], i, cell, &canvas));
  }
  return EncodeRgbPng(width, height, canvas.rgb());
}

absl::Status WritePlotGridPng(const std::vector<LinePlot>& panels, int columns, int width,
                              int height, const std::string& path) {
  ASSIGN_OR_RETURN(const std::vector<uint8_t> png,
                   RenderPlotGridPng(panels, columns, width, height));
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path, " for writing"));
  }
  if (std::fwrite(png.data(), 1, png.size(), file) != png.size()) {
    const int error = errno;
    std::fclose(file);
    return absl::ErrnoToStatus(error, absl::StrCat("cannot write ", path));
  }
  if (std::fclose(file) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace morphserve::plot
