// A minimal PNG encoder for 8-bit RGB images, so that the plot writer needs no
// zlib. Image data goes into stored (uncompressed) deflate blocks: plots are
// small and written rarely, and size matters less than having no dependency.
#ifndef MORPHSERVE_TOOLS_PLOT_PNG_WRITER_H_
#define MORPHSERVE_TOOLS_PLOT_PNG_WRITER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace morphserve::plot {

// Encodes `rgb` (rows top to bottom, 3 bytes per pixel, no padding) as a PNG
// file image. Fails with InvalidArgument unless width and height are positive
// and rgb holds exactly width * height pixels.
absl::StatusOr<std::vector<uint8_t>> EncodeRgbPng(int width, int height,
                                                  std::span<const uint8_t> rgb);

}  // namespace morphserve::plot

#endif  // MORPHSERVE_TOOLS_PLOT_PNG_WRITER_H_
