# CUDA part of the build: included only when QALORA_WITH_CUDA is on (a CUDA
# toolkit and a CUDA build of torch were both found, or QALORA_CUDA=ON).
#
# What a torch CUDA extension needs here, learned the hard way:
#  - C++20 for host and device code (torch >= 2.14 headers require it);
#  - the toolkit root handed to CMake (CUDAToolkit_ROOT, from nvcc's location);
#  - pip-installed CUDA torch ships its own CUDA runtime pieces under the
#    venv's nvidia/cu13 (or cu12) folder: nvrtc is taken from its lib/ and its
#    include/ goes on the include path (torch's headers pull cusparse.h).
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_ARCHITECTURES ${QALORA_CUDA_ARCHS})
# The toolkit root: CMake reads it off nvcc itself (right even when the nvcc
# on PATH is a wrapper script or a link, as /usr/local/bin/nvcc is here).
if(CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
  set(_cuda_root "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
else()
  file(REAL_PATH "${CMAKE_CUDA_COMPILER}" _nvcc_real)
  get_filename_component(_nvcc_bin "${_nvcc_real}" DIRECTORY)
  get_filename_component(_cuda_root "${_nvcc_bin}" DIRECTORY)
endif()
set(CUDAToolkit_ROOT "${_cuda_root}" CACHE PATH "CUDA toolkit root")
find_package(CUDAToolkit REQUIRED)
message(STATUS "qalora_ext: CUDA toolkit ${CUDAToolkit_VERSION} at ${CUDAToolkit_ROOT}, archs ${QALORA_CUDA_ARCHS}")

# The pip wheels' CUDA folder (nvidia/cu13, nvidia/cu12, or the older per-library layout).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import os, sys\ntry:\n import nvidia; roots = list(nvidia.__path__)\nexcept ImportError: roots = []\nfor r in roots:\n for sub in ('cu13', 'cu12'):\n  d = os.path.join(r, sub)\n  if os.path.isdir(d): sys.stdout.write(d); sys.exit(0)"
  OUTPUT_VARIABLE QALORA_PIP_CUDA_DIR)
set(_torch_cuda_libs)
foreach(_lib c10_cuda torch_cuda)
  find_library(_torch_lib_${_lib} ${_lib} PATHS "${TORCH_PY_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
  list(APPEND _torch_cuda_libs ${_torch_lib_${_lib}})
endforeach()

function(qalora_configure_cuda_target target)
  target_compile_definitions(${target} PRIVATE USE_CUDA)  # torch's headers read it
  if(QALORA_PIP_CUDA_DIR)
    target_include_directories(${target} SYSTEM PRIVATE "${QALORA_PIP_CUDA_DIR}/include")
    find_library(_pip_nvrtc nvrtc PATHS "${QALORA_PIP_CUDA_DIR}/lib" NO_DEFAULT_PATH)
    if(_pip_nvrtc)
      target_link_libraries(${target} PRIVATE ${_pip_nvrtc})
    endif()
  endif()
  target_include_directories(${target} SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -lineinfo -Xptxas=-v>)
  target_link_libraries(${target} PRIVATE ${_torch_cuda_libs} CUDA::cudart)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${QALORA_CUDA_ARCHS}")
endfunction()
