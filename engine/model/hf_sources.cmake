# Hugging Face (safetensors) and dummy-weight loading, beside hf_loader.cc.
target_sources(morphserve_engine PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/dummy_weights.cc
  ${CMAKE_CURRENT_LIST_DIR}/hf_config.cc
  ${CMAKE_CURRENT_LIST_DIR}/safetensors_file.cc
)
