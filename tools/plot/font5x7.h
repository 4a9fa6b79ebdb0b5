// A 5x7 bitmap font covering printable ASCII (32..126), for the tick labels,
// titles and legends of the plot writer. Glyphs sit in a 6-pixel advance so
// that adjacent characters keep one blank column between them, and a line of
// text is kGlyphHeight + kGlyphDescent rows tall: the letters with a tail
// below the baseline are drawn lower than the rest.
#ifndef MORPHSERVE_TOOLS_PLOT_FONT5X7_H_
#define MORPHSERVE_TOOLS_PLOT_FONT5X7_H_

#include <array>
#include <cstdint>

namespace morphserve::plot {

inline constexpr int kGlyphWidth = 5;
inline constexpr int kGlyphHeight = 7;
inline constexpr int kGlyphAdvance = kGlyphWidth + 1;
inline constexpr int kGlyphDescent = 2;

// Rows of the glyph for `c`, top row first; bit 4 of a row is its leftmost
// pixel. Characters outside 32..126 get the glyph of '?'.
const std::array<uint8_t, kGlyphHeight>& Glyph(char c);

// How many rows below the top of the line the glyph for `c` starts:
// kGlyphDescent for g, p, q and y, whose bitmaps begin at the x-height so that
// their tails fit below the baseline, and 0 for every other character.
int GlyphDrop(char c);

}  // namespace morphserve::plot

#endif  // MORPHSERVE_TOOLS_PLOT_FONT5X7_H_
