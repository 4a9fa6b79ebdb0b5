#include "engine/tokenizer/unicode.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace morphserve::engine::unicode {
namespace {

using ::testing::ElementsAre;

TEST(UnicodeTest, CodePointClasses) {
  EXPECT_TRUE(IsLetter('a'));
  EXPECT_TRUE(IsLetter(0x4E2D));   // CJK ideograph
  EXPECT_TRUE(IsLetter(0x1D400));  // mathematical bold A (outside the BMP)
  EXPECT_FALSE(IsLetter('1'));
  EXPECT_TRUE(IsNumber('7'));
  EXPECT_TRUE(IsNumber(0x00BD));  // vulgar fraction one half (No)
  EXPECT_TRUE(IsNumber(0x2167));  // roman numeral eight (Nl)
  EXPECT_TRUE(IsWhitespace(0x3000));
  EXPECT_TRUE(IsWhitespace(0x85));
  EXPECT_FALSE(IsWhitespace(0x200B));  // zero-width space is not White_Space
  EXPECT_EQ(CodePointFlags(0x1F999) & (kLetter | kNumber | kWhitespace), 0);  // emoji
  EXPECT_NE(CodePointFlags(0x3001) & kPunctuation, 0);
  EXPECT_EQ(CodePointFlags(0x110000), 0);
}

TEST(UnicodeTest, LenientDecoding) {
  EXPECT_THAT(DecodeUtf8Lenient("a\xC3\xA9\xF0\x9F\xA6\x99"), ElementsAre('a', 0xE9, 0x1F999));
  EXPECT_THAT(DecodeUtf8Lenient("\x80\xC3"), ElementsAre(kReplacementChar, kReplacementChar));
  EXPECT_THAT(DecodeUtf8Lenient("\xF7\xBF\xBF\xBF"),  // past U+10FFFF
              ElementsAre(kReplacementChar, kReplacementChar, kReplacementChar, kReplacementChar));
}

TEST(UnicodeTest, StrictValidation) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("a\xC3\xA9\xE4\xBD\xA0\xF0\x9F\xA6\x99"));
  EXPECT_FALSE(IsValidUtf8("\xC3"));
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // past U+10FFFF
}

TEST(UnicodeTest, ByteLevelAlphabetRoundTrips) {
  EXPECT_EQ(ByteToUnicode(' '), "\xC4\xA0");   // Ġ
  EXPECT_EQ(ByteToUnicode('\n'), "\xC4\x8A");  // Ċ
  EXPECT_EQ(ByteToUnicode('a'), "a");
  for (int b = 0; b < 256; ++b) {
    const std::vector<uint32_t> cps = DecodeUtf8Lenient(ByteToUnicode(static_cast<uint8_t>(b)));
    ASSERT_EQ(cps.size(), 1u);
    EXPECT_EQ(UnicodeToByte(cps[0]), b);
  }
  EXPECT_EQ(UnicodeToByte(0x4E2D), std::nullopt);
}

}  // namespace
}  // namespace morphserve::engine::unicode
