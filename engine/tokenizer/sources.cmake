# Tokenizer sources, included by engine/CMakeLists.txt.
target_sources(morphserve_engine PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/bpe_model.cc
  ${CMAKE_CURRENT_LIST_DIR}/hf_json.cc
  ${CMAKE_CURRENT_LIST_DIR}/hf_pre_tokenizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/incremental_detokenizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/pre_tokenizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/special_tokens.cc
  ${CMAKE_CURRENT_LIST_DIR}/spm_model.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_gguf.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_hf.cc
  ${CMAKE_CURRENT_LIST_DIR}/unicode.cc
  ${CMAKE_CURRENT_LIST_DIR}/vocab.cc
)
target_link_libraries(morphserve_engine PUBLIC absl::flat_hash_map absl::flat_hash_set)
