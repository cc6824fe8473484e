# Driven by the CTest test install_consumer (see the top-level CMakeLists.txt):
#   1. cmake --install BUILD_DIR --prefix WORK_DIR/prefix
#   2. configure, build and run this directory's project against it (find_package(omniattn))
#   3. compile main.cc once more with `pkg-config --cflags --libs omniattn` and run it
foreach(_var BUILD_DIR WORK_DIR CONSUMER_SOURCE_DIR CXX GENERATOR LIBDIR)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "install_consumer: -D${_var}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(_prefix "${WORK_DIR}/prefix")
set(_cmake_build "${WORK_DIR}/cmake-consumer")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  message("---- ${name}: ${ARGN}\n${_out}")
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: step '${name}' failed (${_rc})")
  endif()
endfunction()

run_step(install "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${_prefix}")

foreach(_f include/omniattn/omniattn.h ${LIBDIR}/cmake/omniattn/omniattnConfig.cmake
           ${LIBDIR}/cmake/omniattn/omniattnConfigVersion.cmake ${LIBDIR}/pkgconfig/omniattn.pc
           share/licenses/omniattn/LICENSE)
  if(NOT EXISTS "${_prefix}/${_f}")
    message(FATAL_ERROR "install_consumer: ${_f} was not installed")
  endif()
endforeach()

# find_package route.
run_step(configure "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${_cmake_build}" -G "${GENERATOR}"
         "-DCMAKE_PREFIX_PATH=${_prefix}" "-DCMAKE_CXX_COMPILER=${CXX}" "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
         "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
run_step(build "${CMAKE_COMMAND}" --build "${_cmake_build}")
run_step(run-cmake-consumer "${_cmake_build}/consumer")

# pkg-config route.
find_program(PKG_CONFIG_EXECUTABLE NAMES pkg-config pkgconf REQUIRED)
set(ENV{PKG_CONFIG_PATH} "${_prefix}/${LIBDIR}/pkgconfig")
set(_pc_static "")
if(NOT EXISTS "${_prefix}/${LIBDIR}/libomniattn.so")
  set(_pc_static --static)  # a static libomniattn also needs Highway and OpenMP on the link line
endif()
execute_process(COMMAND "${PKG_CONFIG_EXECUTABLE}" --cflags --libs ${_pc_static} omniattn RESULT_VARIABLE _rc
                OUTPUT_VARIABLE _pc_flags ERROR_VARIABLE _pc_err OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "install_consumer: pkg-config --cflags --libs omniattn failed: ${_pc_err}")
endif()
message("---- pkg-config --cflags --libs ${_pc_static} omniattn: ${_pc_flags}")
separate_arguments(_pc_flags UNIX_COMMAND "${_pc_flags}")
separate_arguments(_cxx_flags UNIX_COMMAND "${CXX_FLAGS}")
set(_pc_exe "${WORK_DIR}/consumer-pkgconfig")
run_step(compile-pkgconfig "${CXX}" ${_cxx_flags} -std=c++20 "${CONSUMER_SOURCE_DIR}/main.cc" -o "${_pc_exe}"
         ${_pc_flags})
set(ENV{LD_LIBRARY_PATH} "${_prefix}/${LIBDIR}")
run_step(run-pkgconfig-consumer "${_pc_exe}")

# The installed CLI finds the installed shared library without LD_LIBRARY_PATH (its RUNPATH is $ORIGIN/../lib).
if(EXISTS "${_prefix}/bin/omniattn" AND EXISTS "${_prefix}/${LIBDIR}/libomniattn.so")
  unset(ENV{LD_LIBRARY_PATH})
  execute_process(COMMAND ldd "${_prefix}/bin/omniattn" RESULT_VARIABLE _rc OUTPUT_VARIABLE _ldd ERROR_VARIABLE _ldd)
  set(_resolved "")
  if(_ldd MATCHES "libomniattn[^ \t\n]* => ([^ \t\n]+)")
    file(REAL_PATH "${CMAKE_MATCH_1}" _resolved)
    get_filename_component(_resolved "${_resolved}" DIRECTORY)
  endif()
  file(REAL_PATH "${_prefix}/${LIBDIR}" _expected)
  if(NOT _rc EQUAL 0 OR _ldd MATCHES "not found" OR NOT _resolved STREQUAL _expected)
    message(FATAL_ERROR "install_consumer: installed omniattn CLI does not resolve the installed library:\n${_ldd}")
  endif()
endif()
message("install_consumer: ok")
