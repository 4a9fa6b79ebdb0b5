# Chat template sources, included by engine/CMakeLists.txt.
target_sources(morphserve_engine PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/chat_detect.cc
  ${CMAKE_CURRENT_LIST_DIR}/chat_render.cc
  ${CMAKE_CURRENT_LIST_DIR}/chat_template.cc
)
