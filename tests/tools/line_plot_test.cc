#include "tools/plot/line_plot.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tools/plot/png_writer.h"

namespace morphserve::plot {
namespace {

// The tests decode PNGs with their own CRC and Adler-32, written bit by bit
// from the specs rather than sharing the encoder's table-driven code, so that
// a mistake in one does not cancel out in the other.
uint32_t BitwiseCrc32(const uint8_t* data, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= data[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
  }
  return ~c;
}

uint32_t SimpleAdler32(const std::vector<uint8_t>& data) {
  uint32_t a = 1, b = 0;
  for (uint8_t v : data) {
    a = (a + v) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

uint32_t ReadBigEndian32(const std::vector<uint8_t>& bytes, size_t at) {
  return (uint32_t{bytes[at]} << 24) | (uint32_t{bytes[at + 1]} << 16) |
         (uint32_t{bytes[at + 2]} << 8) | uint32_t{bytes[at + 3]};
}

struct DecodedImage {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;

  Rgb At(int x, int y) const {
    const size_t i =
        3 * (static_cast<size_t>(y) * static_cast<size_t>(width) + static_cast<size_t>(x));
    return {rgb[i], rgb[i + 1], rgb[i + 2]};
  }
};

// Decodes the subset of PNG the writer produces (8-bit RGB, stored deflate
// blocks, filter 0), checking every checksum and length on the way. Reports
// failures through gtest; call it inside ASSERT_NO_FATAL_FAILURE.
void DecodePng(const std::vector<uint8_t>& png, DecodedImage* image) {
  const std::vector<uint8_t> signature = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  ASSERT_GE(png.size(), signature.size());
  ASSERT_TRUE(std::equal(signature.begin(), signature.end(), png.begin()));

  std::vector<std::string> chunk_types;
  std::vector<uint8_t> zlib;
  size_t at = signature.size();
  while (at < png.size()) {
    ASSERT_LE(at + 12, png.size()) << "truncated chunk header";
    const uint32_t length = ReadBigEndian32(png, at);
    ASSERT_LE(at + 12 + length, png.size()) << "truncated chunk";
    const std::string type(png.begin() + static_cast<ptrdiff_t>(at + 4),
                           png.begin() + static_cast<ptrdiff_t>(at + 8));
    const uint8_t* data = png.data() + at + 8;
    EXPECT_EQ(ReadBigEndian32(png, at + 8 + length), BitwiseCrc32(png.data() + at + 4, length + 4))
        << "CRC of chunk " << type;
    if (type == "IHDR") {
      ASSERT_EQ(length, 13u);
      const std::vector<uint8_t> ihdr(data, data + length);
      image->width = static_cast<int>(ReadBigEndian32(ihdr, 0));
      image->height = static_cast<int>(ReadBigEndian32(ihdr, 4));
      EXPECT_EQ(ihdr[8], 8) << "bit depth";
      EXPECT_EQ(ihdr[9], 2) << "colour type RGB";
      EXPECT_EQ(ihdr[10], 0) << "compression";
      EXPECT_EQ(ihdr[11], 0) << "filter method";
      EXPECT_EQ(ihdr[12], 0) << "interlace";
    } else if (type == "IDAT") {
      zlib.insert(zlib.end(), data, data + length);
    } else {
      EXPECT_TRUE(type == "IEND") << "unexpected chunk " << type;
      EXPECT_EQ(length, 0u);
    }
    chunk_types.push_back(type);
    at += 12 + length;
  }
  ASSERT_GE(chunk_types.size(), 3u);
  EXPECT_EQ(chunk_types.front(), "IHDR");
  EXPECT_EQ(chunk_types.back(), "IEND");

  ASSERT_GE(zlib.size(), 6u);
  EXPECT_EQ(zlib[0] & 0x0F, 8) << "deflate";
  EXPECT_EQ((zlib[0] * 256 + zlib[1]) % 31, 0) << "zlib header check bits";
  EXPECT_EQ(zlib[1] & 0x20, 0) << "no preset dictionary";
  std::vector<uint8_t> raw;
  at = 2;
  bool final = false;
  while (!final) {
    ASSERT_LE(at + 5, zlib.size()) << "truncated stored block header";
    final = (zlib[at] & 1) != 0;
    ASSERT_EQ((zlib[at] >> 1) & 3, 0) << "only stored blocks are expected";
    const uint32_t len = zlib[at + 1] | (uint32_t{zlib[at + 2]} << 8);
    const uint32_t nlen = zlib[at + 3] | (uint32_t{zlib[at + 4]} << 8);
    ASSERT_EQ(len ^ 0xFFFFu, nlen);
    ASSERT_LE(at + 5 + len, zlib.size()) << "truncated stored block";
    raw.insert(raw.end(), zlib.begin() + static_cast<ptrdiff_t>(at + 5),
               zlib.begin() + static_cast<ptrdiff_t>(at + 5 + len));
    at += 5 + len;
  }
  ASSERT_EQ(at + 4, zlib.size()) << "Adler-32 must end the zlib stream";
  EXPECT_EQ(ReadBigEndian32(zlib, at), SimpleAdler32(raw));

  const size_t row_bytes = static_cast<size_t>(image->width) * 3;
  ASSERT_EQ(raw.size(), (row_bytes + 1) * static_cast<size_t>(image->height));
  image->rgb.clear();
  for (size_t y = 0; y < static_cast<size_t>(image->height); ++y) {
    const size_t row = y * (row_bytes + 1);
    ASSERT_EQ(raw[row], 0) << "filter byte of row " << y;
    image->rgb.insert(image->rgb.end(), raw.begin() + static_cast<ptrdiff_t>(row + 1),
                      raw.begin() + static_cast<ptrdiff_t>(row + 1 + row_bytes));
  }
}

constexpr Rgb kWhite{255, 255, 255};

LinePlot BudgetPlot() {
  LinePlot plot;
  plot.title = "Accuracy vs budget";
  plot.x_label = "KV budget (tokens)";
  plot.y_label = "accuracy";
  plot.log2_x = true;
  plot.series = {{"full", {64, 128, 256, 512}, {0.9, 0.9, 0.9, 0.9}},
                 {"h2o", {64, 128, 256, 512}, {0.4, 0.6, 0.75, 0.85}},
                 {"snapkv", {64, 128, 256, 512}, {0.5, 0.7, 0.8, 0.88}}};
  return plot;
}

// First row from the top of column x with colour c, or -1.
int FirstRowWithColor(const DecodedImage& image, int x, Rgb c) {
  for (int y = 0; y < image.height; ++y) {
    if (image.At(x, y) == c) return y;
  }
  return -1;
}

TEST(PngWriterTest, RoundTripsPixelsAcrossSeveralStoredBlocks) {
  // 200 rows of 601 bytes need three 65535-byte stored blocks.
  constexpr int kWidth = 200, kHeight = 200;
  std::vector<uint8_t> rgb(size_t{kWidth} * kHeight * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 7 + i / 601);
  const absl::StatusOr<std::vector<uint8_t>> png = EncodeRgbPng(kWidth, kHeight, rgb);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  EXPECT_EQ(image.width, kWidth);
  EXPECT_EQ(image.height, kHeight);
  EXPECT_EQ(image.rgb, rgb);
}

TEST(PngWriterTest, EncodesOnePixel) {
  const std::vector<uint8_t> rgb = {1, 2, 3};
  const absl::StatusOr<std::vector<uint8_t>> png = EncodeRgbPng(1, 1, rgb);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  EXPECT_EQ(image.rgb, rgb);
}

TEST(PngWriterTest, RejectsMismatchedBuffer) {
  const std::vector<uint8_t> rgb(10);
  EXPECT_EQ(EncodeRgbPng(2, 2, rgb).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeRgbPng(0, 2, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LinePlotTest, RendersValidPngWithRequestedSize) {
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng({BudgetPlot()}, 1, 480, 360);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  EXPECT_EQ(image.width, 480);
  EXPECT_EQ(image.height, 360);
  EXPECT_EQ(image.At(0, 0), kWhite);
  EXPECT_EQ(image.At(479, 359), kWhite);
}

TEST(LinePlotTest, SeriesAreDrawnInTheirOwnColours) {
  for (int i = 0; i < kMaxSeriesPerPanel; ++i) {
    for (int j = 0; j < i; ++j) EXPECT_NE(SeriesColor(i), SeriesColor(j)) << i << " vs " << j;
  }
  // Two flat lines across the whole x range: the one with larger y must cross
  // the middle column higher up.
  LinePlot plot;
  plot.series = {{"low", {0, 10}, {1, 1}}, {"high", {0, 10}, {2, 2}}};
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng({plot}, 1, 400, 300);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  const int low = FirstRowWithColor(image, image.width / 2, SeriesColor(0));
  const int high = FirstRowWithColor(image, image.width / 2, SeriesColor(1));
  ASSERT_GE(low, 0);
  ASSERT_GE(high, 0);
  EXPECT_LT(high, low);
}

TEST(LinePlotTest, PanelsOfAGridEachGetTheirLines) {
  LinePlot left, right;
  left.series = {{"a", {1, 2}, {5, 5}}};
  right.series = {{"a", {1, 2}, {5, 5}}, {"b", {1, 2}, {7, 7}}};
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng({left, right}, 2, 800, 300);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  EXPECT_GE(FirstRowWithColor(image, 200, SeriesColor(0)), 0);
  EXPECT_EQ(FirstRowWithColor(image, 200, SeriesColor(1)), -1);
  EXPECT_GE(FirstRowWithColor(image, 600, SeriesColor(0)), 0);
  EXPECT_GE(FirstRowWithColor(image, 600, SeriesColor(1)), 0);
}

TEST(LinePlotTest, NanLeavesAGapInTheLine) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  LinePlot plot;
  plot.series = {{"gappy", {0, 1, 2, 3, 4}, {1, 1, nan, 1, 1}}};
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng({plot}, 1, 400, 300);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  // The line's row is the one with the most pixels of its colour; along it
  // the segments 1-2 and 2-3 are missing, a gap of about half the width.
  int best_row = -1, best_count = 0;
  for (int y = 0; y < image.height; ++y) {
    int count = 0;
    for (int x = 0; x < image.width; ++x) count += image.At(x, y) == SeriesColor(0);
    if (count > best_count) {
      best_count = count;
      best_row = y;
    }
  }
  ASSERT_GE(best_row, 0);
  int widest_gap = 0, last = -1;
  for (int x = 0; x < image.width; ++x) {
    if (image.At(x, best_row) != SeriesColor(0)) continue;
    if (last >= 0) widest_gap = std::max(widest_gap, x - last);
    last = x;
  }
  EXPECT_GT(widest_gap, image.width / 4);
}

TEST(LinePlotTest, ClipsLinesToAFixedYRange) {
  // A segment from far below to far above y in [0, 1] crosses the box as a
  // vertical line; nothing of it may reach the title area above the box.
  LinePlot plot;
  plot.y_min = 0;
  plot.y_max = 1;
  plot.series = {{"steep", {0, 1}, {-1e300, 1e300}}};
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng({plot}, 1, 400, 300);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
  int line_column = -1;
  for (int x = 0; x < image.width && line_column < 0; ++x) {
    const int top = FirstRowWithColor(image, x, SeriesColor(0));
    if (top >= 0 && top < image.height / 2) line_column = x;
  }
  ASSERT_GE(line_column, 0) << "the crossing segment was not drawn";
  EXPECT_GE(FirstRowWithColor(image, line_column, SeriesColor(0)), 10);
}

TEST(LinePlotTest, DrawsEdgeCasesWithoutFailing) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  LinePlot all_nan;
  all_nan.series = {{"nothing", {1, 2}, {nan, nan}}};
  LinePlot empty;  // no series at all
  LinePlot single_point;
  single_point.log2_x = true;
  single_point.series = {{"one", {128}, {0.5}}};
  LinePlot clipped;  // data far outside a fixed y range
  clipped.y_min = 0;
  clipped.y_max = 1;
  clipped.series = {{"wild", {0, 1, 2, 3}, {-1e300, 1e300, 0.5, inf}}};
  LinePlot many_x;  // more than six budgets on a log axis
  many_x.log2_x = true;
  many_x.series = {{"s", {16, 32, 64, 128, 256, 512, 1024, 2048}, {1, 2, 3, 4, 5, 6, 7, 8}}};
  LinePlot huge_span;  // max - min overflows to infinity
  huge_span.series = {{"huge", {0, 1}, {-1.7e308, 1.7e308}}};
  LinePlot tiny_span;  // only denormals tell the x values apart
  tiny_span.series = {{"tiny", {5e-324, 1e-323}, {0, 1}}};
  LinePlot huge_log;
  huge_log.log2_x = true;
  huge_log.series = {{"far", {1e308}, {1}}};
  LinePlot long_names;
  long_names.title = std::string(200, 'T');
  for (int i = 0; i < kMaxSeriesPerPanel; ++i) {
    long_names.series.push_back({std::string(60, static_cast<char>('a' + i)), {0, 1}, {0, 1}});
  }
  const absl::StatusOr<std::vector<uint8_t>> png = RenderPlotGridPng(
      {all_nan, empty, single_point, clipped, many_x, huge_span, tiny_span, huge_log, long_names},
      3, 1200, 1000);
  ASSERT_TRUE(png.ok()) << png.status();
  DecodedImage image;
  ASSERT_NO_FATAL_FAILURE(DecodePng(*png, &image));
}

void ExpectInvalid(const std::vector<LinePlot>& panels, int columns, int width, int height,
                   const std::string& message_part) {
  const absl::StatusOr<std::vector<uint8_t>> png =
      RenderPlotGridPng(panels, columns, width, height);
  ASSERT_FALSE(png.ok());
  EXPECT_EQ(png.status().code(), absl::StatusCode::kInvalidArgument) << png.status();
  EXPECT_NE(png.status().message().find(message_part), std::string::npos) << png.status();
}

TEST(LinePlotTest, RejectsInvalidInput) {
  ExpectInvalid({}, 1, 400, 300, "no panels");
  ExpectInvalid({BudgetPlot()}, 0, 400, 300, "columns");
  ExpectInvalid({BudgetPlot()}, 1, 199, 300, "at least 200x150");
  ExpectInvalid({BudgetPlot()}, 1, 400, 149, "at least 200x150");
  ExpectInvalid({BudgetPlot(), BudgetPlot()}, 2, 399, 300, "at least 200x150");
  ExpectInvalid({BudgetPlot(), BudgetPlot(), BudgetPlot()}, 2, 400, 299, "at least 200x150");

  LinePlot mismatch = BudgetPlot();
  mismatch.series[1].y.pop_back();
  ExpectInvalid({mismatch}, 1, 400, 300, "series \"h2o\": 4 x values but 3 y values");

  LinePlot too_many;
  for (int i = 0; i <= kMaxSeriesPerPanel; ++i) too_many.series.push_back({"s", {1}, {1}});
  ExpectInvalid({too_many}, 1, 400, 300, "at most 8");

  LinePlot non_positive = BudgetPlot();
  non_positive.series[0].x[0] = 0;
  ExpectInvalid({non_positive}, 1, 400, 300, "log2");

  LinePlot inverted = BudgetPlot();
  inverted.y_min = 1;
  inverted.y_max = 0;
  ExpectInvalid({inverted}, 1, 400, 300, "y_min");
}

TEST(LinePlotTest, WritesFileAndNamesUnwritablePath) {
  const std::string path = ::testing::TempDir() + "/line_plot_test.png";
  ASSERT_TRUE(WritePlotGridPng({BudgetPlot()}, 1, 480, 360, path).ok());
  std::ifstream in(path, std::ios::binary);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
  const absl::StatusOr<std::vector<uint8_t>> expected =
      RenderPlotGridPng({BudgetPlot()}, 1, 480, 360);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(bytes, *expected);

  const std::string bad_path = "/nonexistent-dir-for-plot-test/plot.png";
  const absl::Status status = WritePlotGridPng({BudgetPlot()}, 1, 480, 360, bad_path);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find(bad_path), std::string::npos) << status;
}

}  // namespace
}  // namespace morphserve::plot
